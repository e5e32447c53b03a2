"""The ``"numpy"`` backend's block kernels: the rest of a transformer block, written literally from the math.

These are the oracle for ``kernels/numba/blocks.py`` and ``kernels/cython/blocks.py`` (same names, same signatures)
and what ``fastattn.models`` runs on ``backend="numpy"``. Clear over fast, like ``fastattn.oracle``.

The contract every backend keeps (the caller, ``fastattn.models``, guarantees it):

- arrays are C-contiguous and of one float dtype (float32 or float64); ids are int64 and already in range;
- row-wise kernels take 2-D ``(R, D)`` arrays; ``bias``, ``gamma``, ``beta`` are ``(D,)``; ``eps`` is a float;
- the output comes first and kernels return nothing. Element-wise kernels may be called with ``out is x`` (in place);
  the LayerNorm kernels may be called with ``out`` (or ``out_sum``) being ``x`` or ``residual``.

Kernels (``y`` is ``x + bias`` in the ``bias_*`` forms):

- ``embedding(out, ids, table, position_ids, positions, type_ids, type_table, has_types)``:
  ``out[t] = table[ids[t]] + positions[position_ids[t]] (+ type_table[type_ids[t]])``, ``out`` (T, D).
- ``layer_norm(out, x, gamma, beta, eps)``: ``(x - mean) / sqrt(var + eps) * gamma + beta`` per row (biased var).
- ``gelu(out, x)``, ``bias_gelu(out, x, bias)``: ``0.5 y (1 + erf(y / sqrt 2))``.
- ``gelu_tanh(out, x)``, ``bias_gelu_tanh(out, x, bias)``: ``0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))``.
- ``bias_residual(out, x, bias, residual)``: ``x + bias + residual``.
- ``bias_residual_layer_norm(out, x, bias, residual, gamma, beta, eps)``: ``layer_norm(x + bias + residual)``
  (a post-LN block: BERT).
- ``bias_residual_and_layer_norm(out_sum, out_norm, x, bias, residual, gamma, beta, eps)``: both the new residual
  stream ``x + bias + residual`` and its LayerNorm (a pre-LN block: GPT-2).
- ``split_qkv(q, k, v, qkv, bias, offset)``: ``qkv + bias`` (B, L, 3·H·d) split into heads, ``q`` (B, H, L, d);
  ``k, v`` (B, H, T, d) receive rows ``offset .. offset + L - 1`` (a KV cache), nothing else is written.
- ``merge_heads(out, o)``: ``o`` (B, H, L, d) -> ``out`` (B, L, H·d).

Llama-family kernels:

- ``rms_norm(out, x, gamma, eps)``: ``x / sqrt(mean(x²) + eps) * gamma`` per row (statistics in float64).
- ``add_rms_norm(out_sum, out_norm, x, residual, gamma, eps)``: ``out_sum = x + residual`` and its RMSNorm
  (a pre-norm block's residual add fused with the next norm); ``out_sum`` may be ``residual``.
- ``silu_mul(out, x)``: SwiGLU's activation product. ``x`` (R, 2F) holds gate | up side by side (one matmul with the
  two weights concatenated); ``out`` (R, F) ``= silu(gate) * up``, ``silu(g) = g / (1 + exp(-g))``.
- ``split_qkv_rope(q, k, v, qkv, bias, q_gamma, k_gamma, eps, has_norm, cos, sin, offset)``: ``qkv + bias``
  (B, L, (Hq + 2·Hkv)·d) split into ``q`` (B, Hq, L, d) and the cache rows ``offset .. offset + L - 1`` of ``k, v``
  (B, Hkv, T, d) (grouped-query attention: fewer key/value heads); with ``has_norm`` each q and k head is
  RMS-normalised over d with ``q_gamma`` / ``k_gamma`` (d,) (Qwen3); then q and k are rotated (RoPE, the
  non-interleaved Hugging Face layout of ``rope``) by the angles of each token: ``cos, sin`` (B·L, d // 2), token
  ``b·L + n``. Nothing else is written.
- ``linear(out, x, w)``: ``out (T, N) = x (T, K) @ wᵀ`` with ``w (N, K)`` in Hugging Face ``Linear``'s layout: the
  matmul of a decode step (few rows T), parallel over the rows of ``w`` so that a thread count owns its columns.
- ``text_matmul(out, x, w, lengths)``: ``out[b, :n] = x[b, :n] @ w`` for each sequence ``b`` of ``n = lengths[b]``
  real (leading) rows of ``x`` (B, N, K), ``w`` (K, F); the rows of ``out`` past ``n`` are left as they are. The
  compiled backends run it on the register-blocked micro-kernel of their fused attention, which computes every
  element the same way (the same FMAs, k in order) wherever its row sits, so the bits of a row depend on that row
  and ``w`` only: not on the other sequences of the batch, the padded length or the thread count (what a corpus
  embedded in any partitioning needs; OpenBLAS gives a row other bits by its place and thread split). This oracle
  is the literal loop.
"""

from __future__ import annotations

import math

import numpy as np

from . import _numpy_backend

__all__ = [
    "embedding",
    "layer_norm",
    "gelu",
    "gelu_tanh",
    "bias_gelu",
    "bias_gelu_tanh",
    "bias_residual",
    "bias_residual_layer_norm",
    "bias_residual_and_layer_norm",
    "split_qkv",
    "merge_heads",
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "split_qkv_rope",
    "linear",
    "text_matmul",
    "layer_norm_backward",
    "gelu_backward",
    "gelu_tanh_backward",
    "bias_gelu_backward",
    "bias_gelu_tanh_backward",
    "bias_backward",
    "linear_backward",
    "split_qkv_backward",
    "merge_heads_backward",
    "cross_entropy",
    "get_num_threads",
    "set_num_threads",
]

try:  # the same function, computed by a vectorised library routine when SciPy happens to be installed
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - depends on the environment
    _erf = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------------------------------------------
# The math, one operation per function
# --------------------------------------------------------------------------------------------------------------
def erf(x):
    """The error function, element-wise, in float64."""
    return _erf(np.asarray(x, dtype=np.float64))


def gelu_exact(y):
    """GELU with the Gaussian CDF: 0.5 y (1 + erf(y / √2)). Computed in float64, returned in y's dtype."""
    y64 = np.asarray(y, dtype=np.float64)
    return (0.5 * y64 * (1.0 + erf(y64 / math.sqrt(2.0)))).astype(np.asarray(y).dtype)


def gelu_tanh_form(y):
    """GELU, tanh approximation (GPT-2's "gelu_new"): 0.5 y (1 + tanh(√(2/π) (y + 0.044715 y³)))."""
    y64 = np.asarray(y, dtype=np.float64)
    inner = math.sqrt(2.0 / math.pi) * (y64 + 0.044715 * y64**3)
    return (0.5 * y64 * (1.0 + np.tanh(inner))).astype(np.asarray(y).dtype)


def layer_norm_rows(x, gamma, beta, eps):
    """LayerNorm of each row of x (R, D): biased variance, statistics in float64, result in x's dtype."""
    x64 = np.asarray(x, dtype=np.float64)  # (R, D)
    mean = x64.mean(axis=-1, keepdims=True)  # (R, 1)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)  # (R, 1)
    return ((x64 - mean) / np.sqrt(var + eps) * gamma + beta).astype(x.dtype)  # (R, D)


# --------------------------------------------------------------------------------------------------------------
# The kernels (output first, as the compiled backends)
# --------------------------------------------------------------------------------------------------------------
def embedding(out, ids, table, position_ids, positions, type_ids, type_table, has_types):
    _numpy_backend.gather(out, ids, table)  # (T, D): the one-hot product, a block of tokens at a time
    out += positions[position_ids]  # (T, D) + (T, D)
    if has_types:
        out += type_table[type_ids]  # (T, D)


def layer_norm(out, x, gamma, beta, eps):
    out[...] = layer_norm_rows(x, gamma, beta, eps)


def gelu(out, x):
    out[...] = gelu_exact(x)


def gelu_tanh(out, x):
    out[...] = gelu_tanh_form(x)


def bias_gelu(out, x, bias):
    out[...] = gelu_exact(x + bias)


def bias_gelu_tanh(out, x, bias):
    out[...] = gelu_tanh_form(x + bias)


def bias_residual(out, x, bias, residual):
    out[...] = x + bias + residual


def bias_residual_layer_norm(out, x, bias, residual, gamma, beta, eps):
    out[...] = layer_norm_rows(x + bias + residual, gamma, beta, eps)


def bias_residual_and_layer_norm(out_sum, out_norm, x, bias, residual, gamma, beta, eps):
    total = x + bias + residual  # (R, D)
    out_sum[...] = total
    out_norm[...] = layer_norm_rows(total, gamma, beta, eps)


def split_qkv(q, k, v, qkv, bias, offset):
    B, H, L, d = q.shape
    y = (qkv + bias).reshape(B, L, 3, H, d)  # (B, L, 3, H, d)
    q[...] = y[:, :, 0].transpose(0, 2, 1, 3)  # (B, H, L, d)
    k[:, :, offset : offset + L] = y[:, :, 1].transpose(0, 2, 1, 3)
    v[:, :, offset : offset + L] = y[:, :, 2].transpose(0, 2, 1, 3)


def merge_heads(out, o):
    B, H, L, d = o.shape
    out[...] = o.transpose(0, 2, 1, 3).reshape(B, L, H * d)  # (B, L, H·d)


def get_num_threads():
    return 1


def set_num_threads(n):
    """The oracle is single-threaded NumPy; its thread count cannot change."""


# --------------------------------------------------------------------------------------------------------------
# Llama-family kernels (RMSNorm, SwiGLU, q/k/v heads with RoPE)
# --------------------------------------------------------------------------------------------------------------
def rms_rows(x, gamma, eps):
    """RMSNorm of each row of x (R, D): x / sqrt(mean(x²) + eps) * gamma, statistics in float64."""
    x64 = np.asarray(x, dtype=np.float64)  # (R, D)
    ms = (x64 * x64).mean(axis=-1, keepdims=True)  # (R, 1)
    return (x64 / np.sqrt(ms + eps) * gamma).astype(x.dtype)  # (R, D)


def silu(g):
    """g / (1 + exp(-g)), in float64, returned in g's dtype."""
    g64 = np.asarray(g, dtype=np.float64)
    with np.errstate(over="ignore"):
        return (g64 / (1.0 + np.exp(-g64))).astype(np.asarray(g).dtype)


def rotate_half(x, cos, sin):
    """RoPE, Hugging Face layout: x (..., d), cos/sin (..., d/2) broadcasting against x's leading axes."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]  # (..., d/2) each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (..., d)


def rms_norm(out, x, gamma, eps):
    out[...] = rms_rows(x, gamma, eps)


def add_rms_norm(out_sum, out_norm, x, residual, gamma, eps):
    total = x + residual  # (R, D)
    out_sum[...] = total
    out_norm[...] = rms_rows(total, gamma, eps)


def silu_mul(out, x):
    F = out.shape[1]
    out[...] = silu(x[:, :F]) * x[:, F:]  # (R, F)


def split_qkv_rope(q, k, v, qkv, bias, q_gamma, k_gamma, eps, has_norm, cos, sin, offset):
    B, Hq, L, d = q.shape
    Hkv = k.shape[1]
    y = qkv + bias  # (B, L, (Hq + 2 Hkv) d)
    yq = y[..., : Hq * d].reshape(B, L, Hq, d).transpose(0, 2, 1, 3)  # (B, Hq, L, d)
    yk = y[..., Hq * d : (Hq + Hkv) * d].reshape(B, L, Hkv, d).transpose(0, 2, 1, 3)  # (B, Hkv, L, d)
    yv = y[..., (Hq + Hkv) * d :].reshape(B, L, Hkv, d).transpose(0, 2, 1, 3)
    if has_norm:
        yq = rms_rows(yq.reshape(-1, d), q_gamma, eps).reshape(yq.shape)
        yk = rms_rows(yk.reshape(-1, d), k_gamma, eps).reshape(yk.shape)
    c = cos.reshape(B, 1, L, d // 2)  # (B, 1, L, d/2): one angle set per token, shared by the heads
    s = sin.reshape(B, 1, L, d // 2)
    q[...] = rotate_half(yq, c, s)
    k[:, :, offset : offset + L] = rotate_half(yk, c, s)
    v[:, :, offset : offset + L] = yv


def linear(out, x, w):
    out[...] = x @ w.T  # (T, K) @ (K, N)


def text_matmul(out, x, w, lengths):
    for b, n in enumerate(lengths):
        out[b, :n] = x[b, :n] @ w


# --------------------------------------------------------------------------------------------------------------
# Backward kernels (training: fastattn.models._train). Output arguments first; each output fully overwritten.
#
# - ``layer_norm_backward(grad_x, grad_gamma, grad_beta, grad_out, x, gamma, eps, grad_residual, has_residual)``:
#   the gradients of ``sum(grad_out * layer_norm(x, gamma, beta, eps))``; with ``has_residual`` the incoming
#   ``grad_residual`` (R, D) is added to ``grad_x`` (a pre-LN block: the residual stream's gradient passes through
#   the add). ``grad_x`` may be ``grad_residual`` or ``grad_out``. ``grad_gamma``, ``grad_beta`` (D,) are sums over
#   the rows in increasing row order (bitwise the same for any thread count).
# - ``gelu_backward(grad_x, grad_out, x)``, ``gelu_tanh_backward``, and the ``bias_*`` forms
#   ``(grad_x, grad_out, x, bias)``: ``grad_x = grad_out * gelu'(x (+ bias))``; ``grad_x`` may be ``grad_out``.
# - ``bias_backward(grad_bias, grad_out)``: ``grad_bias (D,) = sum over rows of grad_out (R, D)`` (rows in order);
#   the gradient of a bias add (and of a residual add: the identity, no kernel).
# - ``linear_backward(grad_x, grad_w, grad_out, x, w)``: ``y = x @ w`` -> ``grad_x = grad_out @ wᵀ``,
#   ``grad_w = xᵀ @ grad_out`` (BLAS on every backend).
# - ``split_qkv_backward(grad_qkv, grad_q, grad_k, grad_v)``: grad_q, grad_k, grad_v (B, H, L, d) merged back into
#   ``grad_qkv`` (B, L, 3·H·d) (the bias's gradient is ``bias_backward`` of it).
# - ``merge_heads_backward(grad_o, grad_out)``: grad_out (B, L, H·d) -> grad_o (B, H, L, d).
# - ``cross_entropy(loss, grad_logits, logits, labels, scale)``: for each row r of logits (R, V) with
#   ``labels[r] >= 0``: ``loss[r] = logsumexp(logits[r]) - logits[r, labels[r]]`` and
#   ``grad_logits[r] = scale * (softmax(logits[r]) - onehot(labels[r]))``; rows with a negative label (the ignore
#   index -100) get ``loss[r] = 0`` and a zero gradient. ``grad_logits`` may be ``logits`` (in place). Callers pass
#   a tile of rows at a time, so no more than a tile of probabilities is ever held. Statistics in float64.
# --------------------------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def layer_norm_grads(grad_out, x, gamma, eps):
    """(grad_x, grad_gamma, grad_beta) of LayerNorm, literally from the math, in float64."""
    x64 = np.asarray(x, dtype=np.float64)  # (R, D)
    go = np.asarray(grad_out, dtype=np.float64)  # (R, D)
    D = x64.shape[-1]
    if D == 0:  # rows of nothing: nothing to normalise, no gradient
        return np.zeros_like(x64), np.zeros(0), np.zeros(0)
    mean = x64.mean(axis=-1, keepdims=True)  # (R, 1)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)  # (R, 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (R, 1)
    xhat = (x64 - mean) * rstd  # (R, D)
    grad_xhat = go * np.asarray(gamma, dtype=np.float64)  # (R, D)
    # x̂ = (x - μ) σ⁻¹: ∂L/∂x = σ⁻¹ (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)), the mean and variance paths included
    grad_x = rstd * (
        grad_xhat - grad_xhat.sum(-1, keepdims=True) / D - xhat * (grad_xhat * xhat).sum(-1, keepdims=True) / D
    )
    return grad_x, (go * xhat).sum(axis=0), go.sum(axis=0)  # (R, D), (D,), (D,)


def gelu_exact_grad(y):
    """d/dy of 0.5 y (1 + erf(y / √2)) = Φ(y) + y φ(y), in float64."""
    y64 = np.asarray(y, dtype=np.float64)
    cdf = 0.5 * (1.0 + erf(y64 / math.sqrt(2.0)))  # Φ(y)
    pdf = np.exp(-0.5 * y64 * y64) / math.sqrt(2.0 * math.pi)  # φ(y)
    return cdf + y64 * pdf


def gelu_tanh_grad(y):
    """d/dy of 0.5 y (1 + tanh u), u = √(2/π) (y + 0.044715 y³), in float64."""
    y64 = np.asarray(y, dtype=np.float64)
    th = np.tanh(_SQRT_2_OVER_PI * (y64 + 0.044715 * y64**3))  # tanh u
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * y64 * y64)  # du/dy
    return 0.5 * (1.0 + th) + 0.5 * y64 * (1.0 - th * th) * du


def layer_norm_backward(grad_x, grad_gamma, grad_beta, grad_out, x, gamma, eps, grad_residual, has_residual):
    gx, gg, gb = layer_norm_grads(grad_out, x, gamma, eps)  # (R, D), (D,), (D,)
    if has_residual:
        gx = gx + grad_residual  # the residual add passes its gradient through
    grad_gamma[...] = gg
    grad_beta[...] = gb
    grad_x[...] = gx


def gelu_backward(grad_x, grad_out, x):
    grad_x[...] = grad_out * gelu_exact_grad(x)


def gelu_tanh_backward(grad_x, grad_out, x):
    grad_x[...] = grad_out * gelu_tanh_grad(x)


def bias_gelu_backward(grad_x, grad_out, x, bias):
    grad_x[...] = grad_out * gelu_exact_grad(np.asarray(x, np.float64) + bias)


def bias_gelu_tanh_backward(grad_x, grad_out, x, bias):
    grad_x[...] = grad_out * gelu_tanh_grad(np.asarray(x, np.float64) + bias)


def bias_backward(grad_bias, grad_out):
    grad_bias[...] = np.asarray(grad_out, np.float64).sum(axis=0)  # (D,)


def linear_backward(grad_x, grad_w, grad_out, x, w):
    np.matmul(grad_out, w.T, out=grad_x)  # (R, I) = (R, O) @ (O, I)
    np.matmul(x.T, grad_out, out=grad_w)  # (I, O) = (I, R) @ (R, O)


def split_qkv_backward(grad_qkv, grad_q, grad_k, grad_v):
    B, H, L, d = grad_q.shape
    parts = np.stack([grad_q, grad_k, grad_v], axis=2)  # (B, H, 3, L, d)
    grad_qkv[...] = parts.transpose(0, 3, 2, 1, 4).reshape(B, L, 3 * H * d)  # (B, L, 3, H, d) -> (B, L, 3·H·d)


def merge_heads_backward(grad_o, grad_out):
    B, H, L, d = grad_o.shape
    grad_o[...] = grad_out.reshape(B, L, H, d).transpose(0, 2, 1, 3)  # (B, H, L, d)


def cross_entropy(loss, grad_logits, logits, labels, scale):
    R, Vocab = logits.shape
    z = np.asarray(logits, dtype=np.float64)  # (R, V)
    z = z - z.max(axis=-1, keepdims=True)  # (R, V): the row max subtracted
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (R, V) log softmax
    p = np.exp(log_p)  # (R, V) softmax
    counted = labels >= 0  # (R,) -100: ignored
    onehot = (np.arange(Vocab)[None, :] == labels[:, None]).astype(np.float64)  # (R, V), zero rows when ignored
    nll = -(onehot * log_p).sum(axis=-1)  # (R,): -log p[label]
    loss[...] = np.where(counted, nll, 0.0)
    grad_logits[...] = np.where(counted[:, None], scale * (p - onehot), 0.0)  # (R, V)
