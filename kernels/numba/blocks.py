"""Block kernels for ``fastattn.models``: everything of a transformer block but attention and the matmuls.

Same names and signatures as the oracle ``fastattn._numpy_blocks`` (its docstring is the contract). Each public
name is a thin Python function that normalises the scalars (``eps`` a float, ``offset`` an int, flags bools) and
calls the ``@njit(parallel=True)`` kernel beside it; nothing compiles before its first call, and the machine code is
cached on disk.

Why these are worth compiling (a 6-layer, 384-wide encoder on 32 x 128 tokens): NumPy's GELU makes five passes
over a 4096 x 1536 array and calls a scalar ``erf``; here it is one pass, fused with the bias add, over a
vectorisable rational ``erf``. LayerNorm fused with the bias and residual adds reads its input once instead of
four times. Every kernel is one ``prange`` over rows (tokens), so each thread streams its own rows.

Float32 special functions are branch-free polynomials that LLVM vectorises (this Numba has no SVML):

- ``erf``: x·P(x²)/Q(x²) on x clamped to [-4, 4] (Eigen's rational approximation, the one XLA and TVM use too);
  absolute error below 5e-7, so GELU's below 1e-6 for |x| <= 4.
- tanh-GELU as ``y / (1 + exp(-2u))``, u = √(2/π)(y + 0.044715 y³) (the same function: ½(1 + tanh u) is the
  logistic of 2u), with the vectorisable ``exp`` of ``_math.py``.

Every kernel compiles with NumPy's error model (``error_model="numpy"``) on top of the shared settings of
``_config.py``: without it a float division carries a zero check that keeps the loops scalar.

Float64 uses ``math.erf`` and ``np.exp``: float64 must agree with the oracle to ~1e-10 and is not the fast path.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _config
from ._config import HELPER, PARALLEL, get_num_threads, set_local_threads, set_num_threads
from ._gemm import matmul_tile
from ._math import fast_exp, maxnum

# NumPy's error model: a float division by zero gives inf/nan instead of raising ZeroDivisionError. Python's model
# puts a check and a branch into every division, which stops LLVM from vectorising the GELU loops (10x slower).
KERNEL = {**PARALLEL, "error_model": "numpy"}
INLINE = {**HELPER, "error_model": "numpy"}
INLINE_SERIAL = {**HELPER, "error_model": "numpy", "nogil": True}  # a small serial kernel

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
    "get_num_threads",
    "set_num_threads",
    "set_local_threads",
    "warmup",
]

_SQRT_HALF = 0.7071067811865476  # 1/√2
_SQRT_2_OVER_PI = 0.7978845608028654  # √(2/π)


# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------------------------
@njit(**INLINE)
def erf_f32(x):
    """erf for float32: x·P(x²)/Q(x²) on x clamped to [-4, 4] (|erf| rounds to 1 beyond). NaN stays NaN."""
    xc = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = xc * xc
    p = np.float32(-2.72614225801306e-10)  # numerator, odd: x · (a13 x¹² + ... + a1)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)  # denominator, even: b8 x⁸ + ... + b0
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    r = xc * p / q
    return r if x == x else x


def fast_erf(x):
    """erf for the kernels: the rational approximation for float32, ``math.erf`` for float64."""
    if isinstance(x, np.float32):
        return erf_f32(x)
    return math.erf(x)


@overload(fast_erf, inline="always", jit_options={"fastmath": HELPER["fastmath"]})
def _ol_fast_erf(x):
    if x == types.float32:
        return lambda x: erf_f32(x)
    if x == types.float64:
        return lambda x: math.erf(x)
    return None


def const(y, c):
    """The Python float ``c`` in the precision of the scalar ``y`` (so float32 arithmetic stays float32)."""
    return type(y)(c)


@overload(const, inline="always")
def _ol_const(y, c):
    if y == types.float32:
        return lambda y, c: np.float32(c)
    return lambda y, c: np.float64(c)


@njit(**INLINE)
def gelu_scalar(y):
    """0.5 y (1 + erf(y / √2)) in y's precision."""
    return const(y, 0.5) * y * (const(y, 1.0) + fast_erf(y * const(y, _SQRT_HALF)))


@njit(**INLINE)
def gelu_tanh_scalar(y):
    """0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)), u = √(2/π) (y + 0.044715 y³)."""
    u = const(y, _SQRT_2_OVER_PI) * (y + const(y, 0.044715) * y * y * y)
    t = const(y, -2.0) * u
    r = y / (const(y, 1.0) + fast_exp(min(t, const(y, 88.0))))  # float32 exp is valid up to 88
    return r if t < const(y, 88.0) else y * const(y, 0.0)  # beyond: exactly -0 (and NaN stays NaN)


@njit(**INLINE)
def add_row(o, x, bias):
    """o = x + bias for one row."""
    for j in range(o.shape[0]):
        o[j] = x[j] + bias[j]


@njit(**INLINE)
def normalise_row(o, y, gamma, beta, eps):
    """o = (y - mean) / sqrt(var + eps) * gamma + beta for one row; statistics in float64. ``o`` may be ``y``."""
    D = y.shape[0]
    total = 0.0
    for j in range(D):  # mean
        total += y[j]
    mean = total / D
    sq = 0.0
    for j in range(D):  # biased variance, two-pass
        c = y[j] - mean
        sq += c * c
    rstd = 1.0 / math.sqrt(sq / D + eps)
    m = o.dtype.type(mean)
    rs = o.dtype.type(rstd)
    for j in range(D):  # scale and shift
        o[j] = (y[j] - m) * rs * gamma[j] + beta[j]


# ----------------------------------------------------------------------------------------------------------------
# Kernels: one prange over rows each
# ----------------------------------------------------------------------------------------------------------------
@njit(**KERNEL)
def _embedding(out, ids, table, position_ids, positions, type_ids, type_table, has_types):
    """out[t] = table[ids[t]] + positions[position_ids[t]] (+ type_table[type_ids[t]]).   out (T, D)."""
    T, D = out.shape
    for t in prange(T):
        word = table[ids[t]]  # (D,)
        pos = positions[position_ids[t]]  # (D,)
        if has_types:
            kind = type_table[type_ids[t]]  # (D,)
            for c in range(D):
                out[t, c] = word[c] + pos[c] + kind[c]
        else:
            for c in range(D):
                out[t, c] = word[c] + pos[c]


@njit(**KERNEL)
def _layer_norm(out, x, gamma, beta, eps):
    """LayerNorm of each row.   out, x (R, D); gamma, beta (D,)."""
    R = x.shape[0]
    for r in prange(R):
        normalise_row(out[r], x[r], gamma, beta, eps)


@njit(**KERNEL)
def _gelu(out, x):
    R, D = x.shape
    for r in prange(R):
        for c in range(D):
            out[r, c] = gelu_scalar(x[r, c])


@njit(**KERNEL)
def _gelu_tanh(out, x):
    R, D = x.shape
    for r in prange(R):
        for c in range(D):
            out[r, c] = gelu_tanh_scalar(x[r, c])


@njit(**KERNEL)
def _bias_gelu(out, x, bias):
    """out = gelu(x + bias).   out, x (R, D); bias (D,)."""
    R, D = x.shape
    for r in prange(R):
        for c in range(D):
            out[r, c] = gelu_scalar(x[r, c] + bias[c])


@njit(**KERNEL)
def _bias_gelu_tanh(out, x, bias):
    R, D = x.shape
    for r in prange(R):
        for c in range(D):
            out[r, c] = gelu_tanh_scalar(x[r, c] + bias[c])


@njit(**KERNEL)
def _bias_residual(out, x, bias, residual):
    R, D = x.shape
    for r in prange(R):
        for c in range(D):
            out[r, c] = x[r, c] + bias[c] + residual[r, c]


@njit(**KERNEL)
def _bias_residual_layer_norm(out, x, bias, residual, gamma, beta, eps):
    """out = layer_norm(x + bias + residual): the sum is written into out, then normalised in place."""
    R, D = x.shape
    for r in prange(R):
        o = out[r]
        for c in range(D):
            o[c] = x[r, c] + bias[c] + residual[r, c]
        normalise_row(o, o, gamma, beta, eps)


@njit(**KERNEL)
def _bias_residual_and_layer_norm(out_sum, out_norm, x, bias, residual, gamma, beta, eps):
    """out_sum = x + bias + residual; out_norm = layer_norm(out_sum)."""
    R, D = x.shape
    for r in prange(R):
        s = out_sum[r]
        for c in range(D):
            s[c] = x[r, c] + bias[c] + residual[r, c]
        normalise_row(out_norm[r], s, gamma, beta, eps)


@njit(**KERNEL)
def _split_qkv(q, k, v, qkv, bias, offset):
    """qkv + bias (B, L, 3·H·d) into heads: q (B, H, L, d); k, v (B, H, T, d) at rows offset + n."""
    B, H, L, d = q.shape
    HD = H * d
    for w in prange(B * L):
        b = w // L
        n = w - b * L
        row = qkv[b, n]  # (3·H·d,)
        for h in range(H):  # contiguous row views: the copies vectorise (4-D indexing in the loop does not)
            add_row(q[b, h, n], row[h * d : (h + 1) * d], bias[h * d : (h + 1) * d])
            add_row(k[b, h, offset + n], row[HD + h * d : HD + (h + 1) * d], bias[HD + h * d : HD + (h + 1) * d])
            lo = 2 * HD + h * d
            add_row(v[b, h, offset + n], row[lo : lo + d], bias[lo : lo + d])


@njit(**KERNEL)
def _merge_heads(out, o):
    """o (B, H, L, d) -> out (B, L, H·d)."""
    B, H, L, d = o.shape
    for w in prange(B * L):
        b = w // L
        n = w - b * L
        dst = out[b, n]  # (H·d,)
        for h in range(H):
            src = o[b, h, n]  # (d,)
            for e in range(d):
                dst[h * d + e] = src[e]


# ----------------------------------------------------------------------------------------------------------------
# The contract's names: scalars normalised so that one compiled variant serves every caller
# ----------------------------------------------------------------------------------------------------------------
def embedding(out, ids, table, position_ids, positions, type_ids, type_table, has_types):
    _embedding(out, ids, table, position_ids, positions, type_ids, type_table, bool(has_types))


def layer_norm(out, x, gamma, beta, eps):
    _layer_norm(out, x, gamma, beta, float(eps))


def gelu(out, x):
    _gelu(out, x)


def gelu_tanh(out, x):
    _gelu_tanh(out, x)


def bias_gelu(out, x, bias):
    _bias_gelu(out, x, bias)


def bias_gelu_tanh(out, x, bias):
    _bias_gelu_tanh(out, x, bias)


def bias_residual(out, x, bias, residual):
    _bias_residual(out, x, bias, residual)


def bias_residual_layer_norm(out, x, bias, residual, gamma, beta, eps):
    _bias_residual_layer_norm(out, x, bias, residual, gamma, beta, float(eps))


def bias_residual_and_layer_norm(out_sum, out_norm, x, bias, residual, gamma, beta, eps):
    _bias_residual_and_layer_norm(out_sum, out_norm, x, bias, residual, gamma, beta, float(eps))


def split_qkv(q, k, v, qkv, bias, offset):
    _split_qkv(q, k, v, qkv, bias, int(offset))


def merge_heads(out, o):
    _merge_heads(out, o)


def warmup(dtypes=("float32", "float64")):
    """Compile (or load from the disk cache) every block kernel for ``dtypes``, on tiny arrays."""
    for name in dtypes:
        dt = np.dtype(name)
        B, H, L, d = 1, 2, 3, 4
        D = H * d
        x = np.zeros((B * L, D), dt)
        vec = np.ones(D, dt)
        ids = np.zeros(B * L, np.int64)
        embedding(np.empty_like(x), ids, x, ids, x, ids, x, True)
        layer_norm(np.empty_like(x), x, vec, vec, 1e-5)
        for fn in (gelu, gelu_tanh):
            fn(np.empty_like(x), x)
        for fn in (bias_gelu, bias_gelu_tanh):
            fn(np.empty_like(x), x, vec)
        bias_residual(np.empty_like(x), x, vec, x)
        bias_residual_layer_norm(np.empty_like(x), x, vec, x, vec, vec, 1e-5)
        bias_residual_and_layer_norm(np.empty_like(x), np.empty_like(x), x, vec, x, vec, vec, 1e-5)
        q = np.empty((B, H, L, d), dt)
        split_qkv(q, np.empty_like(q), np.empty_like(q), np.zeros((B, L, 3 * D), dt), np.zeros(3 * D, dt), 0)
        merge_heads(np.empty((B, L, D), dt), q)
        g = np.empty_like(x)
        layer_norm_backward(g, np.empty_like(vec), np.empty_like(vec), x, x, vec, 1e-5, x, True)
        for fn in (gelu_backward, gelu_tanh_backward):
            fn(g, x, x)
        for fn in (bias_gelu_backward, bias_gelu_tanh_backward):
            fn(g, x, x, vec)
        bias_backward(np.empty_like(vec), x)
        split_qkv_backward(np.empty((B, L, 3 * D), dt), q, q, q)
        merge_heads_backward(np.empty_like(q), np.zeros((B, L, D), dt))
        cross_entropy(np.empty(B * L, dt), g, x, ids, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Llama-family kernels: RMSNorm, the SwiGLU product, q/k/v heads with RoPE (contract: fastattn._numpy_blocks)
# ----------------------------------------------------------------------------------------------------------------
@njit(**INLINE)
def rms_row(o, y, gamma, eps):
    """o = y / sqrt(mean(y²) + eps) * gamma for one row; the sum of squares in float64. ``o`` may be ``y``."""
    D = y.shape[0]
    sq = 0.0
    for j in range(D):
        sq += np.float64(y[j]) * y[j]
    rs = o.dtype.type(1.0 / math.sqrt(sq / D + eps))
    for j in range(D):
        o[j] = y[j] * rs * gamma[j]


@njit(**INLINE)
def silu_scalar(g):
    """g / (1 + exp(-g)) in g's precision; exp clamped where float32 overflows (the result is then -0)."""
    t = -g
    r = g / (const(g, 1.0) + fast_exp(min(t, const(g, 88.0))))
    return r if t < const(g, 88.0) else g * const(g, 0.0)


@njit(**KERNEL)
def _rms_norm(out, x, gamma, eps):
    R = x.shape[0]
    for r in prange(R):
        rms_row(out[r], x[r], gamma, eps)


@njit(**KERNEL)
def _add_rms_norm(out_sum, out_norm, x, residual, gamma, eps):
    """out_sum = x + residual; out_norm = rms_norm(out_sum)."""
    R, D = x.shape
    for r in prange(R):
        s = out_sum[r]
        for c in range(D):
            s[c] = x[r, c] + residual[r, c]
        rms_row(out_norm[r], s, gamma, eps)


@njit(**KERNEL)
def _silu_mul(out, x):
    """out (R, F) = silu(x[:, :F]) * x[:, F:]."""
    R, F = out.shape
    for r in prange(R):
        o = out[r]
        gate = x[r, :F]
        up = x[r, F:]
        for c in range(F):
            o[c] = silu_scalar(gate[c]) * up[c]


@njit(**INLINE)
def _head_rope(dst, src, bias, gamma, eps, has_norm, cos, sin):
    """dst (d,) = RoPE(rms_norm?(src + bias)) with the angles cos, sin (d/2,) of one token."""
    d = dst.shape[0]
    h = d // 2
    for e in range(d):
        dst[e] = src[e] + bias[e]
    if has_norm:
        rms_row(dst, dst, gamma, eps)
    for e in range(h):
        x1 = dst[e]
        x2 = dst[e + h]
        dst[e] = x1 * cos[e] - x2 * sin[e]
        dst[e + h] = x2 * cos[e] + x1 * sin[e]


@njit(**KERNEL)
def _split_qkv_rope(q, k, v, qkv, bias, q_gamma, k_gamma, eps, has_norm, cos, sin, offset):
    """qkv + bias (B, L, (Hq + 2 Hkv) d) into q (B, Hq, L, d) and k, v (B, Hkv, T, d) at rows offset + n;
    q and k optionally RMS-normalised per head, then rotated by the token's angles cos, sin (B·L, d/2)."""
    B, Hq, L, d = q.shape
    Hkv = k.shape[1]
    for w in prange(B * L):
        b = w // L
        n = w - b * L
        row = qkv[b, n]  # ((Hq + 2 Hkv) d,)
        c = cos[w]
        s = sin[w]
        for h in range(Hq):
            lo = h * d
            _head_rope(q[b, h, n], row[lo : lo + d], bias[lo : lo + d], q_gamma, eps, has_norm, c, s)
        for h in range(Hkv):
            lo = (Hq + h) * d
            _head_rope(k[b, h, offset + n], row[lo : lo + d], bias[lo : lo + d], k_gamma, eps, has_norm, c, s)
            lo = (Hq + Hkv + h) * d
            add_row(v[b, h, offset + n], row[lo : lo + d], bias[lo : lo + d])


def rms_norm(out, x, gamma, eps):
    _rms_norm(out, x, gamma, float(eps))


def add_rms_norm(out_sum, out_norm, x, residual, gamma, eps):
    _add_rms_norm(out_sum, out_norm, x, residual, gamma, float(eps))


def silu_mul(out, x):
    _silu_mul(out, x)


def split_qkv_rope(q, k, v, qkv, bias, q_gamma, k_gamma, eps, has_norm, cos, sin, offset):
    _split_qkv_rope(q, k, v, qkv, bias, q_gamma, k_gamma, float(eps), bool(has_norm), cos, sin, int(offset))


@njit(**KERNEL)
def _linear(out, x, w):
    """out (T, N) = x (T, K) @ wᵀ, w (N, K): each output column is one thread's dot products (a decode step)."""
    T, K = x.shape
    N = w.shape[0]
    if T == 0:
        return
    zero = const(x[0, 0], 0.0)
    for n in prange(N):
        row = w[n]  # (K,) contiguous
        for t in range(T):
            xr = x[t]
            acc = zero
            for k in range(K):
                acc += xr[k] * row[k]
            out[t, n] = acc


def linear(out, x, w):
    _linear(out, x, w)


#: text_matmul's work items: blocks of ROWS_PER_ITEM token rows (a multiple of the micro-kernel's MR) x
#: COLS_PER_ITEM output columns; a thread's items share a column panel of w (K x COLS_PER_ITEM), which stays in
#: its L2 cache. Measured on the 2-core AMD EPYC (Zen 5), 4096 x 384 rows against 384 x 1536 and 1536 x 384
#: weights: 96 x 128 within a few % of the best shape tried (48..192 x 128..384).
ROWS_PER_ITEM = 96
COLS_PER_ITEM = 128


@njit(**KERNEL)
def _text_matmul(out, x, w, lengths, N):
    """out[r] = x[r] @ w for the real rows r (row t of sequence b is real when t < lengths[b]) of x (B·N, K).

    Items (row block, column panel), the column panels outermost so that consecutive items reuse w's panel. Within
    an item, each sequence's run of real rows is one call of the micro-kernel (``_gemm.matmul_tile``), which
    computes every element the same way wherever its row sits (the same FMAs, k in order): a row's bits depend
    on that row and w only, not on its batch, its place, the padding or the threads."""
    T, F = x.shape[0], w.shape[1]
    n_rows = (T + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    n_cols = (F + COLS_PER_ITEM - 1) // COLS_PER_ITEM
    for item in prange(n_rows * n_cols):
        i0 = (item % n_rows) * ROWS_PER_ITEM
        j0 = (item // n_rows) * COLS_PER_ITEM
        i1 = min(T, i0 + ROWS_PER_ITEM)
        j1 = min(F, j0 + COLS_PER_ITEM)
        r = i0
        while r < i1:
            b = r // N
            slot_end = min(i1, (b + 1) * N)
            real_end = min(slot_end, b * N + lengths[b])
            if r < real_end:
                matmul_tile(out[r:real_end, j0:j1], x[r:real_end], w[:, j0:j1], False)
            r = slot_end


def text_matmul(out, x, w, lengths):
    """The per-sequence matmul (contract: ``fastattn._numpy_blocks``) on the micro-kernel of the fused attention."""
    B, N, K = x.shape
    if B * N == 0 or w.shape[1] == 0:
        return
    if K == 0:
        for b in range(B):
            out[b, : lengths[b]] = 0
        return
    _config.use_num_threads()
    _config.launch(_text_matmul, out.reshape(B * N, -1), x.reshape(B * N, K), w, lengths, N)



# ----------------------------------------------------------------------------------------------------------------
# Backward kernels (training). Contract: the backward section of fastattn/_numpy_blocks.py.
#
# Sums over rows (grad_gamma, grad_beta, grad_bias) in two passes: fixed chunks of CHUNK rows, each summed in float64
# along its rows (parallel over chunks, streaming rows), then the chunks' partial sums added in chunk order
# (parallel over columns). The chunks do not depend on the thread count, so neither do the results (bitwise).
# ----------------------------------------------------------------------------------------------------------------
CHUNK = 64  # rows per partial sum


@njit(**INLINE)
def gelu_grad_scalar(y):
    """d/dy 0.5 y (1 + erf(y/√2)) = Φ(y) + y φ(y)."""
    cdf = const(y, 0.5) * (const(y, 1.0) + fast_erf(y * const(y, _SQRT_HALF)))
    pdf = fast_exp(const(y, -0.5) * y * y) * const(y, 0.3989422804014327)  # exp(-y²/2) / √(2π)
    return cdf + y * pdf


@njit(**INLINE)
def gelu_tanh_grad_scalar(y):
    """d/dy 0.5 y (1 + tanh u): with s = ½(1 + tanh u) = 1 / (1 + exp(-2u)), it is s + 2 y s (1 - s) du/dy.

    1 - s is computed as 1 / (1 + exp(2u)) (no cancellation where s is near 1); both exponents are clamped at 80 so
    that no intermediate overflows (fast-math may reorder the products)."""
    y2 = y * y
    u = const(y, _SQRT_2_OVER_PI) * (y + const(y, 0.044715) * y2 * y)
    du = const(y, _SQRT_2_OVER_PI) * (const(y, 1.0) + const(y, 3.0 * 0.044715) * y2)
    t = const(y, -2.0) * u
    s = const(y, 1.0) / (const(y, 1.0) + fast_exp(min(t, const(y, 80.0))))  # s = 1 / (1 + e^t), e^t finite
    s_neg = const(y, 1.0) / (const(y, 1.0) + fast_exp(min(-t, const(y, 80.0))))  # 1 - s, without cancellation
    return s + const(y, 2.0) * y * (s * s_neg) * du


@njit(**KERNEL)
def _layer_norm_param_partials(stats, part_g, part_b, grad_out, x, eps):
    """Per chunk c of rows: each row's (mean, 1/std) into stats (float64, two-pass variance), and
    part_g[c] = Σ over the chunk's rows of grad_out x̂, part_b[c] = Σ of grad_out (float64, rows in order)."""
    R, D = x.shape
    for c in prange(part_g.shape[0]):
        acc_g = part_g[c]
        acc_b = part_b[c]
        acc_g[:] = 0.0
        acc_b[:] = 0.0
        for r in range(c * CHUNK, min((c + 1) * CHUNK, R)):
            xr = x[r]
            go = grad_out[r]
            total = 0.0
            for j in range(D):
                total += xr[j]
            mean = total / D
            sq = 0.0
            for j in range(D):
                d = xr[j] - mean
                sq += d * d
            rstd = 1.0 / math.sqrt(sq / D + eps)
            stats[r, 0] = mean
            stats[r, 1] = rstd
            for j in range(D):
                g = np.float64(go[j])
                acc_g[j] += g * ((xr[j] - mean) * rstd)
                acc_b[j] += g


@njit(**INLINE_SERIAL)
def _sum_partials(out, part):
    """out[j] = Σ_c part[c, j] in chunk order (serial: a few dozen rows of partial sums)."""
    n, D = part.shape
    acc = np.zeros(D, np.float64)
    for c in range(n):
        for j in range(D):
            acc[j] += part[c, j]
    for j in range(D):
        out[j] = acc[j]


@njit(**KERNEL)
def _layer_norm_input_grad(grad_x, grad_out, x, gamma, stats, grad_residual, has_residual):
    """grad_x = σ⁻¹ (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) (+ grad_residual), ĝ = grad_out γ; in place on grad_out allowed.

    In float64 throughout (float32 inputs are widened element by element): σ⁻¹ can be large (1/√eps for a
    constant row), and it would magnify the rounding of a float32 ĝ - mean(ĝ) (a fused multiply-add keeps the
    product unrounded) far beyond float32's own error.
    """
    R, D = x.shape
    for r in prange(R):
        xr = x[r]
        go = grad_out[r]
        m = stats[r, 0]
        rs = stats[r, 1]
        s1 = 0.0
        s2 = 0.0
        for j in range(D):
            g = np.float64(go[j]) * gamma[j]
            s1 += g
            s2 += g * ((xr[j] - m) * rs)
        m1 = s1 / D
        m2 = s2 / D
        gx = grad_x[r]
        if has_residual:
            res = grad_residual[r]
            for j in range(D):
                gx[j] = rs * (np.float64(go[j]) * gamma[j] - m1 - (xr[j] - m) * rs * m2) + res[j]
        else:
            for j in range(D):
                gx[j] = rs * (np.float64(go[j]) * gamma[j] - m1 - (xr[j] - m) * rs * m2)


@njit(**KERNEL)
def _bias_partials(part, grad_out):
    """part[c] = Σ over chunk c's rows of grad_out (float64, rows in order)."""
    R, D = grad_out.shape
    for c in prange(part.shape[0]):
        acc = part[c]
        acc[:] = 0.0
        for r in range(c * CHUNK, min((c + 1) * CHUNK, R)):
            go = grad_out[r]
            for j in range(D):
                acc[j] += go[j]


def _make_gelu_backward(grad_scalar, with_bias):
    """A kernel grad_x = grad_out * gelu'(x (+ bias)) for one form: one loop body each, so that LLVM vectorises it."""
    if with_bias:

        def kernel(grad_x, grad_out, x, bias):
            R, D = x.shape
            for r in prange(R):
                gx = grad_x[r]
                go = grad_out[r]
                xr = x[r]
                for c in range(D):
                    gx[c] = go[c] * grad_scalar(xr[c] + bias[c])

    else:

        def kernel(grad_x, grad_out, x):
            R, D = x.shape
            for r in prange(R):
                gx = grad_x[r]
                go = grad_out[r]
                xr = x[r]
                for c in range(D):
                    gx[c] = go[c] * grad_scalar(xr[c])

    return njit(**KERNEL)(kernel)


_gelu_backward = _make_gelu_backward(gelu_grad_scalar, False)
_gelu_tanh_backward = _make_gelu_backward(gelu_tanh_grad_scalar, False)
_bias_gelu_backward = _make_gelu_backward(gelu_grad_scalar, True)
_bias_gelu_tanh_backward = _make_gelu_backward(gelu_tanh_grad_scalar, True)


@njit(**KERNEL)
def _split_qkv_backward(grad_qkv, grad_q, grad_k, grad_v):
    """grad_q, grad_k, grad_v (B, H, L, d) -> grad_qkv (B, L, 3·H·d)."""
    B, H, L, d = grad_q.shape
    HD = H * d
    for w in prange(B * L):
        b = w // L
        n = w - b * L
        row = grad_qkv[b, n]  # (3·H·d,)
        for h in range(H):
            src_q = grad_q[b, h, n]
            src_k = grad_k[b, h, n]
            src_v = grad_v[b, h, n]
            for e in range(d):
                row[h * d + e] = src_q[e]
            for e in range(d):
                row[HD + h * d + e] = src_k[e]
            for e in range(d):
                row[2 * HD + h * d + e] = src_v[e]


@njit(**KERNEL)
def _merge_heads_backward(grad_o, grad_out):
    """grad_out (B, L, H·d) -> grad_o (B, H, L, d)."""
    B, H, L, d = grad_o.shape
    for w in prange(B * L):
        b = w // L
        n = w - b * L
        src = grad_out[b, n]
        for h in range(H):
            dst = grad_o[b, h, n]
            for e in range(d):
                dst[e] = src[h * d + e]


@njit(**KERNEL)
def _cross_entropy(loss, grad_logits, logits, labels, scale):
    """Per row: loss = logsumexp - logit[label]; grad = scale (softmax - onehot); label < 0: 0 and 0. In place ok."""
    R, Vocab = logits.shape
    for r in prange(R):
        z = logits[r]
        g = grad_logits[r]
        label = labels[r]
        if label < 0:
            loss[r] = 0.0
            for j in range(Vocab):
                g[j] = 0.0
            continue
        m = z[0]
        for j in range(1, Vocab):  # row max (NaN-ignoring, vectorised)
            m = maxnum(m, z[j])
        total = 0.0
        for j in range(Vocab):  # sum of exp in float64
            total += fast_exp(z[j] - m)
        picked = z[label]
        loss[r] = (m - picked) + math.log(total)
        inv = z.dtype.type(scale / total)
        for j in range(Vocab):  # probabilities recomputed, scaled: the only pass that writes
            g[j] = fast_exp(z[j] - m) * inv
        g[label] -= z.dtype.type(scale)


def _chunks(R: int) -> int:
    return max(1, (R + CHUNK - 1) // CHUNK)


def layer_norm_backward(grad_x, grad_gamma, grad_beta, grad_out, x, gamma, eps, grad_residual, has_residual):
    R, D = x.shape
    stats = np.empty((R, 2), np.float64)  # (R, 2): mean, 1/std
    part_g = np.empty((_chunks(R), D), np.float64)  # first: grad_x may overwrite grad_out
    part_b = np.empty((_chunks(R), D), np.float64)
    _layer_norm_param_partials(stats, part_g, part_b, grad_out, x, float(eps))
    _sum_partials(grad_gamma, part_g)
    _sum_partials(grad_beta, part_b)
    _layer_norm_input_grad(grad_x, grad_out, x, gamma, stats, grad_residual, bool(has_residual))


def gelu_backward(grad_x, grad_out, x):
    _gelu_backward(grad_x, grad_out, x)


def gelu_tanh_backward(grad_x, grad_out, x):
    _gelu_tanh_backward(grad_x, grad_out, x)


def bias_gelu_backward(grad_x, grad_out, x, bias):
    _bias_gelu_backward(grad_x, grad_out, x, bias)


def bias_gelu_tanh_backward(grad_x, grad_out, x, bias):
    _bias_gelu_tanh_backward(grad_x, grad_out, x, bias)


def bias_backward(grad_bias, grad_out):
    part = np.empty((_chunks(grad_out.shape[0]), grad_out.shape[1]), np.float64)
    _bias_partials(part, grad_out)
    _sum_partials(grad_bias, part)


def linear_backward(grad_x, grad_w, grad_out, x, w):
    """y = x @ w: grad_x = grad_out @ wᵀ, grad_w = xᵀ @ grad_out (BLAS)."""
    np.matmul(grad_out, w.T, out=grad_x)
    np.matmul(x.T, grad_out, out=grad_w)


def split_qkv_backward(grad_qkv, grad_q, grad_k, grad_v):
    _split_qkv_backward(grad_qkv, grad_q, grad_k, grad_v)


def merge_heads_backward(grad_o, grad_out):
    _merge_heads_backward(grad_o, grad_out)


def cross_entropy(loss, grad_logits, logits, labels, scale):
    _cross_entropy(loss, grad_logits, logits, labels, float(scale))
