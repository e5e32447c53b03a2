"""Training a GPT-2-family decoder: the forward pass that keeps its activations, the backward pass, the loss.

``GPT2Model.loss_and_grads`` delegates here. Every line runs a kernel of the chosen backend (the attention family of
kernels/README.md and the block family of ``fastattn._numpy_blocks``, forward and backward) or a BLAS matmul. The
backward walks the forward in reverse (llm.c's ``gpt2_backward``), each step with the shape it produces::

    forward (per block, saved: h, a1, q, k, v, o, lse, ctx, h_mid, a2, f, g)        backward
    a1 = LN_1(h)                                    (T, D)     grad_h += LN_1'(grad_a1)   layer_norm_backward
    q, k, v = split(a1 @ W_attn + b_attn)           (B,H,L,d)  grad_a1, grad_W_attn, grad_b_attn
    o, lse = attention(q, k, v, causal, padding)    (B,H,L,d)  grad_q, grad_k, grad_v     attention_backward
    ctx = merge(o)                                  (T, D)     grad_o                     merge_heads_backward
    h_mid = h + ctx @ W_proj + b_proj               (T, D)     grad_ctx, grad_W_proj, grad_b_proj
    a2 = LN_2(h_mid)                                (T, D)     grad_h_mid += LN_2'(grad_a2)
    f = a2 @ W_fc;  g = GELU(f + b_fc)              (T, F)     grad_f = grad_g GELU'(f + b_fc)
    h' = h_mid + g @ W_out + b_out                  (T, D)     grad_g, grad_W_out, grad_b_out
    after the last block: a = LN_f(h);  loss = CE(a @ wteᵀ, labels)   (the logits a tile of rows at a time)

The loss head never holds the (T, V) logits: a tile of ``LOSS_TILE_ELEMENTS // V`` rows is multiplied out, turned
into its loss and (in place) its gradient by the fused ``cross_entropy`` kernel, and multiplied back into the
gradients of ``a`` and of the tied embedding before the next tile.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .. import _call
from . import _ops
from ._checkpoint import WEIGHT_FILE, read_config

#: Hugging Face's ignore index: a label the loss skips.
IGNORE_INDEX = -100

#: The logits tile of the loss head: at most this many (rows x vocabulary) entries at once (8 Mi = 32 MiB float32).
LOSS_TILE_ELEMENTS = 1 << 23

#: Run the backends' kernels on one thread inside a training step, the BLAS matmuls on all of them. A step
#: alternates matmuls with element-wise kernels, and OpenBLAS's worker threads spin for a while after each matmul:
#: a parallel kernel right after one waits for the cores they hold (about 10 ms a kernel, ~100 kernels a step).
#: Measured on 2 cores (6 x 384 GPT-2, 8 x 256 tokens): 5.1 s a step with parallel kernels, 3.6 s with serial ones.
#: The kernels' results do not depend on their thread count, so this changes the time only.
SERIAL_KERNELS = True

#: The forward activation kernel (config.json's activation_function) -> its backward kernel.
BACKWARD_OF = {"bias_gelu": "bias_gelu_backward", "bias_gelu_tanh": "bias_gelu_tanh_backward"}

#: The checkpoint names of one block's tensors, in the order of ``_Layer``'s fields.
LAYER_TENSORS = (
    ("ln1_g", "ln_1.weight"),
    ("ln1_b", "ln_1.bias"),
    ("w_attn", "attn.c_attn.weight"),
    ("b_attn", "attn.c_attn.bias"),
    ("w_proj", "attn.c_proj.weight"),
    ("b_proj", "attn.c_proj.bias"),
    ("ln2_g", "ln_2.weight"),
    ("ln2_b", "ln_2.bias"),
    ("w_fc", "mlp.c_fc.weight"),
    ("b_fc", "mlp.c_fc.bias"),
    ("w_out", "mlp.c_proj.weight"),
    ("b_out", "mlp.c_proj.bias"),
)


def check_batch(cfg, input_ids, labels, attention_mask):
    """Validated ``(ids, shifted_labels, keep)``: ids and labels int64 (B, L), keep bool (B, L) or None.

    ``shifted_labels[:, t]`` is ``labels[:, t + 1]`` (-100 at the last position), what position t is scored on.
    """
    ids, squeeze = _ops.token_ids("input_ids", input_ids, cfg.vocab_size)
    B, L = ids.shape
    if ids.size == 0:
        raise ValueError(f"input_ids is empty (shape {ids.shape}): a training batch needs at least one sequence")
    if L > cfg.max_positions:
        raise ValueError(f"input_ids has sequences of {L} tokens, more than n_positions={cfg.max_positions}")
    if labels is None:
        lab = ids
    else:
        if isinstance(labels, (str, bytes)):
            raise TypeError(f"labels must be an integer array, got {type(labels).__name__}")
        lab = np.asarray(labels)
        if lab.dtype == np.bool_ or not np.issubdtype(lab.dtype, np.integer):
            raise TypeError(f"labels must be an integer array of token ids (or -100), got: labels.dtype={lab.dtype}")
        if squeeze and lab.ndim == 1:
            lab = lab[None]
        if lab.shape != ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {ids.shape}, got {np.shape(labels)}")
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= cfg.vocab_size))
        if bad.any():
            raise IndexError(
                f"labels holds {int(lab[bad][0])}, which is neither a token id in [0, {cfg.vocab_size}) nor the "
                f"ignore index {IGNORE_INDEX}"
            )
    shifted = np.full((B, L), IGNORE_INDEX, np.int64)
    shifted[:, :-1] = lab[:, 1:]  # position t predicts token t + 1
    if not (shifted >= 0).any():
        raise ValueError(
            "no position has a label to predict (labels are all -100 after the shift, or the sequences have one "
            "token): the mean loss is undefined"
        )
    keep = _ops.keep_mask("attention_mask", attention_mask, (B, L))
    return ids, shifted, keep


def init_weights(cfg, seed: int, dtype) -> dict:
    """GPT-2's initialisation (Hugging Face's ``GPT2PreTrainedModel._init_weights``): normal std 0.02 for every
    weight and embedding, std 0.02 / √(2·n_layer) for the residual projections (attn and mlp ``c_proj``), biases
    0, LayerNorm 1 and 0. Drawn in float64 in a fixed order from ``numpy.random.default_rng(seed)``, then cast."""
    from .gpt2 import _Layer

    rng = np.random.default_rng(seed)
    D, F, Vn = cfg.hidden_size, cfg.inner_size, cfg.vocab_size
    std, std_res = 0.02, 0.02 / math.sqrt(2 * max(cfg.num_layers, 1))

    def normal(shape, s=std):
        return np.ascontiguousarray(rng.standard_normal(shape) * s, dtype=dtype)

    def const(n, value):
        return np.full(n, value, dtype)

    w = {"wte": normal((Vn, D)), "wpe": normal((cfg.max_positions, D))}
    layers = []
    for i in range(cfg.num_layers):
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= i + 1
        layers.append(
            _Layer(
                ln1_g=const(D, 1.0),
                ln1_b=const(D, 0.0),
                w_attn=normal((D, 3 * D)),
                b_attn=const(3 * D, 0.0),
                w_proj=normal((D, D), std_res),
                b_proj=const(D, 0.0),
                ln2_g=const(D, 1.0),
                ln2_b=const(D, 0.0),
                w_fc=normal((D, F)),
                b_fc=const(F, 0.0),
                w_out=normal((F, D), std_res),
                b_out=const(D, 0.0),
                scale=scale,
            )
        )
    w["layers"] = layers
    w["lnf_g"], w["lnf_b"] = const(D, 1.0), const(D, 0.0)
    w["lm_head"] = w["wte"].T if cfg.tie_word_embeddings else normal((Vn, D)).T
    return w


def config_dict(model) -> dict:
    """config.json of ``model``: the file it was loaded from (when there is one), with every field the decoder
    uses written from its ``GPT2Config``."""
    cfg = model.config
    base = {}
    if model.path and os.path.isfile(os.path.join(model.path, "config.json")):
        base = read_config(model.path)
    else:  # trained here: no dropout (fastattn trains without it)
        base = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    base.update(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_positions,
        n_ctx=cfg.max_positions,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.inner_size,
        activation_function=cfg.activation,
        layer_norm_epsilon=cfg.layer_norm_eps,
        scale_attn_weights=cfg.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=cfg.tie_word_embeddings,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        torch_dtype=str(model.dtype),
    )
    for key in ("bos_token_id",):
        base.setdefault(key, cfg.eos_token_id)
    return base


def save_pretrained(model, path) -> None:
    """config.json + model.safetensors (the safetensors package's NumPy writer; names without a prefix)."""
    try:
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise ImportError('save_pretrained writes safetensors files: pip install "fastattn[models]"') from exc
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {name: np.ascontiguousarray(p) for name, p in parameters(model).items()}
    config = config_dict(model)
    tmp = os.path.join(path, WEIGHT_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})  # Hugging Face checks the format field
    os.replace(tmp, os.path.join(path, WEIGHT_FILE))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def parameters(model) -> dict[str, np.ndarray]:
    """The live weight arrays of ``model`` by checkpoint name (``wte.weight``, ``h.0.attn.c_attn.weight``, ...)."""
    w = model._w
    params = {"wte.weight": w["wte"], "wpe.weight": w["wpe"]}
    for i, layer in enumerate(w["layers"]):
        for field, name in LAYER_TENSORS:
            params[f"h.{i}.{name}"] = getattr(layer, field)
    params["ln_f.weight"] = w["lnf_g"]
    params["ln_f.bias"] = w["lnf_b"]
    if not model.config.tie_word_embeddings:
        head = w["lm_head"]  # (D, V) for the forward: keep it a view of a (V, D) array, the checkpoint's layout
        if head.base is None or not head.T.flags.c_contiguous:
            w["lm_head"] = np.ascontiguousarray(head.T).T
        params["lm_head.weight"] = w["lm_head"].T
    return params


def loss_and_grads(model, ids: np.ndarray, labels: np.ndarray, keep: np.ndarray | None, backend, timings=None):
    """Mean cross-entropy of ``labels`` (B, L; -100 ignored; already shifted) and the gradient of every tensor.

    ``ids`` and ``labels`` are validated int64 (B, L) arrays, ``keep`` a bool (B, L) padding mask or None.
    ``timings``: a dict that receives the seconds of each part ("forward", "loss head", "backward") (the bench).
    """
    clock = time.perf_counter
    t0 = clock()
    cfg, w = model.config, model._w
    kern, blk = _ops.kernels(model.backend if backend is None else backend)
    dt = model.dtype
    B, L = ids.shape
    T, D, H, d, F, Vn = B * L, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.inner_size, cfg.vocab_size
    eps = cfg.layer_norm_eps
    act_name = _ops.activation_kernel(cfg.activation, "activation_function")
    act, act_back = getattr(blk, act_name), getattr(blk, BACKWARD_OF[act_name])
    flat_labels = np.ascontiguousarray(labels.reshape(-1))
    count = int(np.count_nonzero(flat_labels >= 0))
    params = parameters(model)
    grads = {name: np.empty_like(p) for name, p in params.items()}
    with _ops.threads_for(0 if SERIAL_KERNELS else T * max(D, F), kern, blk):
        # ---------------------------------------------------------------------------------------- forward
        bias = _ops.key_bias(keep, dt)  # (B, L): -inf at padded keys, None without padding
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(L, dtype=np.int64), (B, L))).reshape(-1)
        no_types = np.zeros(1, np.int64)
        h = np.empty((T, D), dt)
        blk.embedding(h, ids.reshape(-1), w["wte"], positions, w["wpe"], no_types, w["wpe"][:1], False)
        saved = []
        for layer in w["layers"]:
            s = {"h": h}
            s["a1"] = a1 = np.empty((T, D), dt)
            blk.layer_norm(a1, h, layer.ln1_g, layer.ln1_b, eps)
            qkv = a1 @ layer.w_attn  # (T, 3D)
            q, k, v = (np.empty((B, H, L, d), dt) for _ in range(3))
            blk.split_qkv(q, k, v, qkv.reshape(B, L, 3 * D), layer.b_attn, 0)
            o = np.empty((B, H, L, d), dt)
            lse = np.empty((B, H, L), dt)
            _call.attention_into(kern, o, q, k, v, layer.scale, True, 0, None, bias, lse=lse)
            s.update(q=q, k=k, v=v, o=o, lse=lse)
            s["ctx"] = ctx = np.empty((T, D), dt)
            blk.merge_heads(ctx.reshape(B, L, D), o)
            proj = ctx @ layer.w_proj  # (T, D)
            s["h_mid"] = h_mid = np.empty((T, D), dt)
            s["a2"] = a2 = np.empty((T, D), dt)
            blk.bias_residual_and_layer_norm(h_mid, a2, proj, layer.b_proj, h, layer.ln2_g, layer.ln2_b, eps)
            s["f"] = f = a2 @ layer.w_fc  # (T, F) before the bias
            s["g"] = g = np.empty((T, F), dt)
            act(g, f, layer.b_fc)
            out = g @ layer.w_out  # (T, D)
            h = np.empty((T, D), dt)
            blk.bias_residual(h, out, layer.b_out, s["h_mid"])
            saved.append(s)
        a = np.empty((T, D), dt)
        blk.layer_norm(a, h, w["lnf_g"], w["lnf_b"], eps)
        t1 = clock()

        # ---------------------------------------------------------------------- loss head, a tile at a time
        head = w["lm_head"]  # (D, V): wteᵀ when tied
        grad_head = np.zeros((D, Vn), dt) if not cfg.tie_word_embeddings else None
        grad_wte = grads["wte.weight"]  # (V, D): the tied head's gradient, then the embedding's added
        grad_wte[...] = 0
        grad_a = np.empty((T, D), dt)
        rows = max(1, LOSS_TILE_ELEMENTS // max(Vn, 1))
        total = 0.0
        scale = 1.0 / count
        row_loss = np.empty(min(rows, T), dt)
        tile = np.empty((min(rows, T), Vn), dt)  # the logits of a tile of rows, then (in place) their gradient
        product = np.empty((Vn, D) if grad_head is None else (D, Vn), dt)  # one tile's share of the head's gradient
        for start in range(0, T, rows):
            stop = min(start + rows, T)
            logits = tile[: stop - start]
            np.matmul(a[start:stop], head, out=logits)  # (R, V)
            blk.cross_entropy(row_loss[: stop - start], logits, logits, flat_labels[start:stop], scale)
            total += float(np.sum(row_loss[: stop - start], dtype=np.float64))
            np.matmul(logits, head.T, out=grad_a[start:stop])  # (R, D)
            if grad_head is None:
                np.matmul(logits.T, a[start:stop], out=product)  # (V, D)
                grad_wte += product
            else:
                np.matmul(a[start:stop].T, logits, out=product)  # (D, V)
                grad_head += product
        loss = total / count
        if grad_head is not None:
            grads["lm_head.weight"][...] = grad_head.T
        t2 = clock()

        # ----------------------------------------------------------------------------------------- backward
        grad_h = np.empty((T, D), dt)
        blk.layer_norm_backward(grad_h, grads["ln_f.weight"], grads["ln_f.bias"], grad_a, h, w["lnf_g"], eps,
                                grad_h, False)  # fmt: skip
        grad_a1 = grad_a  # reused: (T, D)
        grad_f = np.empty((T, F), dt)
        grad_ctx = np.empty((T, D), dt)
        grad_o, grad_q, grad_k, grad_v = (np.empty((B, H, L, d), dt) for _ in range(4))
        grad_qkv = np.empty((T, 3 * D), dt)
        for i in range(len(w["layers"]) - 1, -1, -1):
            layer, s = w["layers"][i], saved[i]
            p = f"h.{i}."
            # MLP: h' = h_mid + g @ W_out + b_out
            blk.bias_backward(grads[p + "mlp.c_proj.bias"], grad_h)
            np.matmul(s["g"].T, grad_h, out=grads[p + "mlp.c_proj.weight"])  # (F, D)
            np.matmul(grad_h, layer.w_out.T, out=grad_f)  # (T, F) = grad_g
            act_back(grad_f, grad_f, s["f"], layer.b_fc)  # grad of f + b_fc
            blk.bias_backward(grads[p + "mlp.c_fc.bias"], grad_f)
            np.matmul(s["a2"].T, grad_f, out=grads[p + "mlp.c_fc.weight"])  # (D, F)
            grad_a2 = grad_ctx  # (T, D) scratch
            np.matmul(grad_f, layer.w_fc.T, out=grad_a2)
            # a2 = LN_2(h_mid); the residual passes grad_h on: grad_h_mid = LN_2'(grad_a2) + grad_h
            blk.layer_norm_backward(grad_h, grads[p + "ln_2.weight"], grads[p + "ln_2.bias"], grad_a2, s["h_mid"],
                                    layer.ln2_g, eps, grad_h, True)  # fmt: skip
            # attention: h_mid = h + merge(o) @ W_proj + b_proj
            blk.bias_backward(grads[p + "attn.c_proj.bias"], grad_h)
            np.matmul(s["ctx"].T, grad_h, out=grads[p + "attn.c_proj.weight"])  # (D, D)
            np.matmul(grad_h, layer.w_proj.T, out=grad_ctx)  # (T, D)
            blk.merge_heads_backward(grad_o, grad_ctx.reshape(B, L, D))
            _call.attention_backward_into(kern, grad_q, grad_k, grad_v, grad_o, s["q"], s["k"], s["v"], s["o"],
                                          s["lse"], layer.scale, True, 0, None, bias)  # fmt: skip
            blk.split_qkv_backward(grad_qkv.reshape(B, L, 3 * D), grad_q, grad_k, grad_v)
            blk.bias_backward(grads[p + "attn.c_attn.bias"], grad_qkv)
            np.matmul(s["a1"].T, grad_qkv, out=grads[p + "attn.c_attn.weight"])  # (D, 3D)
            np.matmul(grad_qkv, layer.w_attn.T, out=grad_a1)  # (T, D)
            # a1 = LN_1(h); grad_h (of the block's input) = LN_1'(grad_a1) + grad_h_mid
            blk.layer_norm_backward(grad_h, grads[p + "ln_1.weight"], grads[p + "ln_1.bias"], grad_a1, s["h"],
                                    layer.ln1_g, eps, grad_h, True)  # fmt: skip
            saved[i] = None  # free the block's activations as soon as they are used
        # embeddings: h0 = wte[ids] + wpe[positions]
        grad_table = np.empty((Vn, D), dt)
        kern.gather_backward(grad_table, grad_h, np.ascontiguousarray(ids.reshape(-1)))
        grad_wte += grad_table
        kern.add_positions_backward(grads["wpe.weight"], grad_h.reshape(B, L, D), 0)
    if timings is not None:
        timings.update({"forward": t1 - t0, "loss head": t2 - t1, "backward": clock() - t2})
    return loss, grads
