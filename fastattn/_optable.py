"""The one table of operations: every raw kernel, its family, its arguments, and how its gradient is computed.

Each backend implements each family in one module (``fastattn._backends.MODULES`` names them, as code): the
attention pipeline (``embedding``, ``positions``, ``attention``) in one, the transformer blocks in another. From this
table come the dispatch (``_backends.kernels``), the Cython backend's exports, and the completeness test
(``tests/test_layout.py``: every backend implements every operation, or its module says why not in
``UNSUPPORTED``). ``kernels/README.md`` is the contract in prose; a test keeps it listing every row.

To add an operation: one row here, its oracle (``fastattn/oracle.py`` or ``fastattn/_numpy_blocks.py``), one
function per backend module, and a test against the oracle (see "Adding a kernel" in ``kernels/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("embedding", "positions", "attention", "blocks")

#: The families each backend module serves: the pipeline module and the blocks module.
PIPELINE = ("embedding", "positions", "attention")


@dataclass(frozen=True)
class Op:
    name: str
    family: str
    args: str  # outputs first, shapes in the kernel's terms
    computes: str
    backward: str = ""  # the operation (a row of this table) or the rule that gives its gradient; "" = not yet


OPS: tuple[Op, ...] = (
    # ---- embedding ------------------------------------------------------------------------------------------------
    Op(
        "gather",
        "embedding",
        "out (T, D), ids (T,) int64, table (V, D)",
        "out[t] = table[ids[t]]",
        backward="gather_backward",
    ),
    Op(
        "gather_backward",
        "embedding",
        "grad_table (V, D), grad_out (T, D), ids (T,) int64",
        "grad_table[v] = sum of grad_out[t] over ids[t] == v, in increasing t (any thread count: the same bits)",
    ),
    Op(
        "gather_add_positions",
        "embedding",
        "out (T, D), ids (T,), table (V, D), positions (P, D), seq_len, offset",
        "out[t] = table[ids[t]] + positions[offset + t % seq_len]",
    ),
    # ---- positions ------------------------------------------------------------------------------------------------
    Op(
        "add_positions",
        "positions",
        "out (B, N, D), x (B, N, D), positions (P, D), offset",
        "out[b, n] = x[b, n] + positions[offset + n]",
        backward="add_positions_backward (x's gradient is grad_out itself)",
    ),
    Op(
        "add_positions_backward",
        "positions",
        "grad_positions (P, D), grad_out (B, N, D), offset",
        "rows offset.. = sum over b of grad_out[b, n]; the other rows 0",
    ),
    Op(
        "rope",
        "positions",
        "out (B, N, d), x (B, N, d), cos (N, d/2), sin (N, d/2), interleaved",
        "rotary embedding of each feature pair",
        backward="rope with -sin (the inverse rotation)",
    ),
    # ---- attention ------------------------------------------------------------------------------------------------
    Op(
        "scores",
        "attention",
        "out (B, Hq, L, S), q (B, Hq, L, E), k (B, Hkv, S, E), scale, causal, causal_offset, window, "
        "mask (B, Hq, L, S), has_mask, key_bias (B, S), has_key_bias",
        "masked, scaled Q Kᵀ",
        backward="scores_backward",
    ),
    Op(
        "scores_backward",
        "attention",
        "grad_q (B, Hq, L, E), grad_k (B, Hkv, S, E), grad_s (B, Hq, L, S), q, k, scale",
        "grad_q = scale grad_s k; grad_k = scale Σ_group grad_sᵀ q",
    ),
    Op("softmax", "attention", "out (R, S), s (R, S)", "row softmax (out may be s)", backward="softmax_backward"),
    Op(
        "softmax_backward",
        "attention",
        "grad_s (R, S), grad_p (R, S), p (R, S)",
        "grad_s = p (grad_p − rowsum(grad_p p))",
    ),
    Op(
        "weighted_sum",
        "attention",
        "out (B, Hq, L, Ev), p (B, Hq, L, S), v (B, Hkv, S, Ev)",
        "out = p @ v per head",
        backward="weighted_sum_backward",
    ),
    Op(
        "weighted_sum_backward",
        "attention",
        "grad_p (B, Hq, L, S), grad_v (B, Hkv, S, Ev), grad_out (B, Hq, L, Ev), p, v",
        "grad_p = grad_out vᵀ; grad_v = Σ_group pᵀ grad_out",
    ),
    Op(
        "attention",
        "attention",
        "out (B, Hq, L, Ev), lse (B, Hq, L), q, k, v, scale, causal, causal_offset, window, mask, has_mask, "
        "key_bias, has_key_bias",
        "fused weighted_sum(softmax(scores(...))) and each row's log-sum-exp, memory O(N)",
        backward="attention_backward",
    ),
    Op(
        "attention_backward",
        "attention",
        "grad_q, grad_k, grad_v, grad_out (B, Hq, L, Ev), q, k, v, out, lse, scale, causal, causal_offset, window, "
        "mask, has_mask, key_bias, has_key_bias",
        "flash-style gradients: P recomputed from lse, D = rowsum(grad_out out), no races (any thread count: the "
        "same bits)",
    ),
    # ---- blocks (fastattn.models) ---------------------------------------------------------------------------------
    Op(
        "embedding",
        "blocks",
        "out (T, D), ids, table, position_ids, positions, type_ids, type_table, has_types",
        "token + position (+ token type) rows",
    ),
    Op(
        "layer_norm",
        "blocks",
        "out (R, D), x (R, D), gamma (D,), beta (D,), eps",
        "LayerNorm per row",
        backward="layer_norm_backward",
    ),
    Op("gelu", "blocks", "out (R, D), x (R, D)", "exact GELU (erf)", backward="gelu_backward"),
    Op("gelu_tanh", "blocks", "out (R, D), x (R, D)", "tanh-approximated GELU", backward="gelu_tanh_backward"),
    Op("bias_gelu", "blocks", "out (R, D), x (R, D), bias (D,)", "gelu(x + bias)", backward="bias_gelu_backward"),
    Op(
        "bias_gelu_tanh",
        "blocks",
        "out (R, D), x (R, D), bias (D,)",
        "gelu_tanh(x + bias)",
        backward="bias_gelu_tanh_backward",
    ),
    Op("bias_residual", "blocks", "out (R, D), x, bias (D,), residual", "x + bias + residual"),
    Op(
        "bias_residual_layer_norm",
        "blocks",
        "out (R, D), x, bias, residual, gamma, beta, eps",
        "layer_norm(x + bias + residual) (post-LN)",
    ),
    Op(
        "bias_residual_and_layer_norm",
        "blocks",
        "out_sum (R, D), out_norm (R, D), x, bias, residual, gamma, beta, eps",
        "the residual stream and its LayerNorm (pre-LN)",
    ),
    Op(
        "split_qkv",
        "blocks",
        "q (B, H, L, d), k (B, H, T, d), v (B, H, T, d), qkv (B, L, 3·H·d), bias, offset",
        "qkv + bias split into heads; k, v rows offset.. (a KV cache)",
        backward="split_qkv_backward",
    ),
    Op("merge_heads", "blocks", "out (B, L, H·d), o (B, H, L, d)", "heads merged", backward="merge_heads_backward"),
    # ---- blocks of the Llama family ---------------------------------------------------------------------------------
    Op("rms_norm", "blocks", "out (R, D), x (R, D), gamma (D,), eps", "x / sqrt(mean(x²) + eps) · gamma"),
    Op(
        "add_rms_norm",
        "blocks",
        "out_sum (R, D), out_norm (R, D), x, residual, gamma, eps",
        "the residual stream x + residual and its RMSNorm",
    ),
    Op("silu_mul", "blocks", "out (R, F), x (R, 2F)", "silu(x[:, :F]) · x[:, F:] (SwiGLU's gate times up)"),
    Op(
        "split_qkv_rope",
        "blocks",
        "q (B, Hq, L, d), k (B, Hkv, T, d), v (B, Hkv, T, d), qkv (B, L, (Hq + 2 Hkv) d), bias, q_gamma, k_gamma, eps, "
        "has_norm, cos (L, d/2), sin (L, d/2), offset",
        "qkv + bias split into heads, per-head RMSNorm of q, k (Qwen3) when has_norm, RoPE; k, v rows offset..",
    ),
    Op("linear", "blocks", "out (T, N), x (T, K), w (N, K)", "x @ wᵀ for a few rows (decode steps)"),
    Op(
        "text_matmul",
        "blocks",
        "out (B, N, F), x (B, N, K), w (K, F), lengths (B,) int64",
        "out[b, :n_b] = x[b, :n_b] @ w on the fused attention's micro-kernel (rows past n_b untouched): a row's "
        "bits depend on that row and w only, not on its batch, place, padding or the thread count",
    ),
    # ---- blocks: the backward kernels of training (fastattn.models._train) -----------------------------------------
    Op(
        "layer_norm_backward",
        "blocks",
        "grad_x (R, D), grad_gamma (D,), grad_beta (D,), grad_out (R, D), x, gamma, eps, grad_residual, has_residual",
        "LayerNorm's gradients (+ grad_residual passed through when has_residual); sums over rows in fixed chunks",
    ),
    Op("gelu_backward", "blocks", "grad_x (R, D), grad_out (R, D), x (R, D)", "grad_out · gelu'(x)"),
    Op("gelu_tanh_backward", "blocks", "grad_x (R, D), grad_out (R, D), x (R, D)", "grad_out · gelu_tanh'(x)"),
    Op("bias_gelu_backward", "blocks", "grad_x (R, D), grad_out, x, bias (D,)", "grad_out · gelu'(x + bias)"),
    Op("bias_gelu_tanh_backward", "blocks", "grad_x (R, D), grad_out, x, bias (D,)", "grad_out · gelu_tanh'(x + bias)"),
    Op("bias_backward", "blocks", "grad_bias (D,), grad_out (R, D)", "the column sums (fixed order)"),
    Op(
        "linear_backward",
        "blocks",
        "grad_x (R, I), grad_w (I, O), grad_out (R, O), x (R, I), w (I, O)",
        "y = x @ w: grad_x = grad_out wᵀ, grad_w = xᵀ grad_out (BLAS)",
    ),
    Op(
        "split_qkv_backward",
        "blocks",
        "grad_qkv (B, L, 3·H·d), grad_q, grad_k, grad_v (B, H, L, d)",
        "the heads merged back into the fused qkv layout",
    ),
    Op("merge_heads_backward", "blocks", "grad_o (B, H, L, d), grad_out (B, L, H·d)", "grad_out split into heads"),
    Op(
        "cross_entropy",
        "blocks",
        "loss (R,), grad_logits (R, V), logits (R, V), labels (R,) int64, scale",
        "softmax cross-entropy per row and scale · its gradient, a row tile at a time; labels < 0 ignored",
    ),
)

BY_NAME: dict[tuple[str, str], Op] = {(op.family, op.name): op for op in OPS}


def of_families(families) -> tuple[Op, ...]:
    """The rows of the given families, in table order."""
    return tuple(op for op in OPS if op.family in families)


def module_families(family: str) -> tuple[str, ...]:
    """The families served by the backend module that serves ``family`` (pipeline or blocks)."""
    return PIPELINE if family in PIPELINE else (family,)
