# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# fastattn: isa-variants
"""Block kernels for fastattn.models: embedding, LayerNorm, GELU, bias/residual adds, head split and merge.

The contract (names, signatures, in-place rules) is the docstring of fastattn/_numpy_blocks.py; the Numba twin is
kernels/numba/blocks.py. Every kernel is one `prange` over rows (tokens); the loop along a row is contiguous and
written branch-free so that gcc vectorises it without -ffast-math:

- float32 erf is Eigen's rational approximation x·P(x²)/Q(x²) on x clamped to [-4, 4] (absolute error < 5e-7);
  float64 uses libm's erf.
- tanh-GELU is y / (1 + exp(-2u)), u = √(2/π)(y + 0.044715 y³) (½(1 + tanh u) is the logistic of 2u), with the
  vectorisable float32 exp of _common.pxi; float64 uses libm's exp.
- LayerNorm statistics are reduced in LANES partial sums (a vector register's worth) and combined in double.
- setup.py also builds this file as ``_blocks_avx2`` and ``_blocks_avx512`` (the marker line above); blocks.py loads
  the widest build the CPU runs, as the attention kernels do (GELU is compute-bound: 4x faster with AVX-512).
- Every row loop that writes goes through a LANES-long local buffer (compute into it, then copy out): the models
  call these kernels in place (out is x, or out is the residual), and gcc vectorises a loop whose output may alias
  an input only behind a run-time overlap check, which in-place calls fail: they would run scalar (10x slower).
"""

from cython.parallel cimport prange
from libc.math cimport erf, exp, sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free

include "_common.pxi"

# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers
# ----------------------------------------------------------------------------------------------------------------
cdef inline float erf_f32(float x) noexcept nogil:
    """erf for float32 (branch-free): x·P(x²)/Q(x²) on x clamped to [-4, 4]. NaN stays NaN."""
    cdef float xc = x if x > <float>-4.0 else <float>-4.0
    xc = xc if xc < <float>4.0 else <float>4.0
    cdef float x2 = xc * xc
    cdef float p = <float>-2.72614225801306e-10
    p = p * x2 + <float>2.77068142495902e-08
    p = p * x2 + <float>-2.10102402082508e-06
    p = p * x2 + <float>-5.69250639462346e-05
    p = p * x2 + <float>-7.34990630326855e-04
    p = p * x2 + <float>-2.95459980854025e-03
    p = p * x2 + <float>-1.60960333262415e-02
    cdef float q = <float>-1.45660718464996e-05
    q = q * x2 + <float>-2.13374055278905e-04
    q = q * x2 + <float>-1.68282697438203e-03
    q = q * x2 + <float>-7.37332916720468e-03
    q = q * x2 + <float>-1.42647390514189e-02
    cdef float r = xc * p / q
    return r if x == x else x


cdef inline floating gelu_scalar(floating y) noexcept nogil:
    """0.5 y (1 + erf(y / √2))."""
    if floating is float:
        return <float>0.5 * y * (<float>1.0 + erf_f32(y * <float>0.7071067811865476))
    else:
        return 0.5 * y * (1.0 + erf(y * 0.7071067811865476))


cdef inline floating gelu_tanh_scalar(floating y) noexcept nogil:
    """0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)), u = √(2/π) (y + 0.044715 y³)."""
    cdef floating u = <floating>0.7978845608028654 * (y + <floating>0.044715 * y * y * y)
    cdef floating t = <floating>-2.0 * u
    cdef floating r
    if floating is float:
        r = y / (<float>1.0 + fexpf(t if t < <float>88.0 else <float>88.0))
    else:
        r = y / (1.0 + exp(t if t < 88.0 else 88.0))
    return r if t < <floating>88.0 else y * <floating>0.0   # beyond: exactly -0 (and NaN stays NaN)


cdef inline void normalise_row(floating* o, const floating* y, Py_ssize_t D, const floating* gamma,
                               const floating* beta, double eps) noexcept nogil:
    """o = (y - mean) / sqrt(var + eps) * gamma + beta for one row; o may be y."""
    cdef floating acc[LANES]
    cdef floating c, m, rs
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = D - D % LANES
    cdef double total = 0.0, mean, sq = 0.0
    for u in range(LANES):  # mean
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            acc[u] = acc[u] + y[j * LANES + u]
    for j in range(nfull, D):
        total += y[j]
    for u in range(LANES):
        total += acc[u]
    mean = total / D
    m = <floating>mean
    for u in range(LANES):  # biased variance, two-pass
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            c = y[j * LANES + u] - m
            acc[u] = acc[u] + c * c
    for j in range(nfull, D):
        c = y[j] - m
        sq += c * c
    for u in range(LANES):
        sq += acc[u]
    rs = <floating>(1.0 / sqrt(sq / D + eps))
    cdef floating tmp[LANES]
    for j in range(0, nfull // LANES):  # scale and shift, through tmp (o may be y)
        for u in range(LANES):
            tmp[u] = (y[j * LANES + u] - m) * rs * gamma[j * LANES + u] + beta[j * LANES + u]
        for u in range(LANES):
            o[j * LANES + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = (y[j] - m) * rs * gamma[j] + beta[j]


cdef inline void gelu_row(floating* o, const floating* x, const floating* bias, Py_ssize_t D) noexcept nogil:
    """o = gelu(x + bias) for one row (erf form); o may be x."""
    cdef floating tmp[LANES]
    cdef Py_ssize_t jb, j, u, nfull = D - D % LANES
    for jb in range(nfull // LANES):
        j = jb * LANES
        for u in range(LANES):
            tmp[u] = gelu_scalar(x[j + u] + bias[j + u])
        for u in range(LANES):
            o[j + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = gelu_scalar(x[j] + bias[j])


cdef inline void gelu_tanh_row(floating* o, const floating* x, const floating* bias, Py_ssize_t D) noexcept nogil:
    """o = gelu_tanh(x + bias) for one row; o may be x."""
    cdef floating tmp[LANES]
    cdef Py_ssize_t jb, j, u, nfull = D - D % LANES
    for jb in range(nfull // LANES):
        j = jb * LANES
        for u in range(LANES):
            tmp[u] = gelu_tanh_scalar(x[j + u] + bias[j + u])
        for u in range(LANES):
            o[j + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = gelu_tanh_scalar(x[j] + bias[j])


cdef inline void add3_row(floating* o, const floating* x, const floating* bias, const floating* r,
                          Py_ssize_t D) noexcept nogil:
    """o = x + bias + r for one row; o may be x or r."""
    cdef floating tmp[LANES]
    cdef Py_ssize_t jb, j, u, nfull = D - D % LANES
    for jb in range(nfull // LANES):
        j = jb * LANES
        for u in range(LANES):
            tmp[u] = x[j + u] + bias[j + u] + r[j + u]
        for u in range(LANES):
            o[j + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = x[j] + bias[j] + r[j]


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
def embedding(floating[:, ::1] out, const int64_t[::1] ids, const floating[:, ::1] table,
              const int64_t[::1] position_ids, const floating[:, ::1] positions, const int64_t[::1] type_ids,
              const floating[:, ::1] type_table, bint has_types):
    """out[t] = table[ids[t]] + positions[position_ids[t]] (+ type_table[type_ids[t]])."""
    cdef Py_ssize_t T = out.shape[0], D = out.shape[1], t, c
    cdef floating* orow
    cdef const floating* word
    cdef const floating* pos
    cdef const floating* kind
    if T * D == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=_n_threads):
            orow = &out[t, 0]
            word = &table[ids[t], 0]
            pos = &positions[position_ids[t], 0]
            if has_types:
                kind = &type_table[type_ids[t], 0]
                for c in range(D):
                    orow[c] = word[c] + pos[c] + kind[c]
            else:
                for c in range(D):
                    orow[c] = word[c] + pos[c]


def layer_norm(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] gamma,
               const floating[::1] beta, double eps):
    """LayerNorm of each row (biased variance)."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            normalise_row(&out[r, 0], &x[r, 0], D, &gamma[0], &beta[0], eps)


cdef enum:
    GELU_ERF = 0
    GELU_TANH = 1


cdef int _gelu_rows(floating[:, ::1] out, const floating[:, ::1] x, const floating* bias, int form) except -1:
    """out[r] = gelu(x[r] + bias) for every row, in the erf or the tanh form; bias NULL: no bias."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r
    cdef floating* zeros = NULL
    if R * D == 0:
        return 0
    if bias == NULL:  # the row loops always add a bias: zeros
        zeros = <floating*>calloc(D, sizeof(floating))
        if zeros == NULL:
            raise MemoryError()
        bias = zeros
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            if form == GELU_TANH:
                gelu_tanh_row(&out[r, 0], &x[r, 0], bias, D)
            else:
                gelu_row(&out[r, 0], &x[r, 0], bias, D)
    free(zeros)
    return 0


def gelu(floating[:, ::1] out, const floating[:, ::1] x):
    """out = 0.5 x (1 + erf(x / √2))."""
    _gelu_rows(out, x, <const floating*>NULL, GELU_ERF)


def gelu_tanh(floating[:, ::1] out, const floating[:, ::1] x):
    """out = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    _gelu_rows(out, x, <const floating*>NULL, GELU_TANH)


def bias_gelu(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] bias):
    """out = gelu(x + bias)."""
    if x.shape[0] * x.shape[1] != 0:
        _gelu_rows(out, x, &bias[0], GELU_ERF)


def bias_gelu_tanh(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] bias):
    """out = gelu_tanh(x + bias)."""
    if x.shape[0] * x.shape[1] != 0:
        _gelu_rows(out, x, &bias[0], GELU_TANH)


def bias_residual(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] bias,
                  const floating[:, ::1] residual):
    """out = x + bias + residual."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r, c
    cdef floating* orow
    cdef const floating* xrow
    cdef const floating* rrow
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            orow = &out[r, 0]
            xrow = &x[r, 0]
            rrow = &residual[r, 0]
            add3_row(orow, xrow, &bias[0], rrow, D)


def bias_residual_layer_norm(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] bias,
                             const floating[:, ::1] residual, const floating[::1] gamma,
                             const floating[::1] beta, double eps):
    """out = layer_norm(x + bias + residual): the sum goes into out, then is normalised in place."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r, c
    cdef floating* orow
    cdef const floating* xrow
    cdef const floating* rrow
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            orow = &out[r, 0]
            xrow = &x[r, 0]
            rrow = &residual[r, 0]
            add3_row(orow, xrow, &bias[0], rrow, D)
            normalise_row(orow, orow, D, &gamma[0], &beta[0], eps)


def bias_residual_and_layer_norm(floating[:, ::1] out_sum, floating[:, ::1] out_norm, const floating[:, ::1] x,
                                 const floating[::1] bias, const floating[:, ::1] residual,
                                 const floating[::1] gamma, const floating[::1] beta, double eps):
    """out_sum = x + bias + residual; out_norm = layer_norm(out_sum)."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r, c
    cdef floating* srow
    cdef const floating* xrow
    cdef const floating* rrow
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            srow = &out_sum[r, 0]
            xrow = &x[r, 0]
            rrow = &residual[r, 0]
            add3_row(srow, xrow, &bias[0], rrow, D)
            normalise_row(&out_norm[r, 0], srow, D, &gamma[0], &beta[0], eps)


def split_qkv(floating[:, :, :, ::1] q, floating[:, :, :, ::1] k, floating[:, :, :, ::1] v,
              const floating[:, :, ::1] qkv, const floating[::1] bias, Py_ssize_t offset):
    """qkv + bias (B, L, 3·H·d) split into heads: q (B, H, L, d); k, v (B, H, T, d) at rows offset + n."""
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], L = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t HD = H * d, w, b, n, h, e
    cdef const floating* row
    cdef floating* dst
    if B * H * L * d == 0:
        return
    with nogil:
        for w in prange(B * L, schedule="static", num_threads=_n_threads):
            b = w // L
            n = w - b * L
            row = &qkv[b, n, 0]
            for h in range(H):
                dst = &q[b, h, n, 0]
                for e in range(d):
                    dst[e] = row[h * d + e] + bias[h * d + e]
                dst = &k[b, h, offset + n, 0]
                for e in range(d):
                    dst[e] = row[HD + h * d + e] + bias[HD + h * d + e]
                dst = &v[b, h, offset + n, 0]
                for e in range(d):
                    dst[e] = row[2 * HD + h * d + e] + bias[2 * HD + h * d + e]


def merge_heads(floating[:, :, ::1] out, const floating[:, :, :, ::1] o):
    """o (B, H, L, d) -> out (B, L, H·d)."""
    cdef Py_ssize_t B = o.shape[0], H = o.shape[1], L = o.shape[2], d = o.shape[3]
    cdef Py_ssize_t w, b, n, h, e
    cdef floating* dst
    cdef const floating* src
    if B * H * L * d == 0:
        return
    with nogil:
        for w in prange(B * L, schedule="static", num_threads=_n_threads):
            b = w // L
            n = w - b * L
            for h in range(H):
                dst = &out[b, n, h * d]
                src = &o[b, h, n, 0]
                for e in range(d):
                    dst[e] = src[e]


# ----------------------------------------------------------------------------------------------------------------
# Llama-family kernels: RMSNorm, the SwiGLU product, q/k/v heads with RoPE (contract: fastattn/_numpy_blocks.py)
# ----------------------------------------------------------------------------------------------------------------
cdef inline void rms_row(floating* o, const floating* y, Py_ssize_t D, const floating* gamma,
                         double eps) noexcept nogil:
    """o = y / sqrt(mean(y²) + eps) * gamma for one row; o may be y. Squares summed in LANES partials, in double."""
    cdef double acc[LANES]
    cdef floating tmp[LANES]
    cdef floating rs
    cdef Py_ssize_t j, u, nfull = D - D % LANES
    cdef double sq = 0.0
    for u in range(LANES):
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            acc[u] = acc[u] + <double>y[j * LANES + u] * y[j * LANES + u]
    for j in range(nfull, D):
        sq += <double>y[j] * y[j]
    for u in range(LANES):
        sq += acc[u]
    rs = <floating>(1.0 / sqrt(sq / D + eps))
    for j in range(0, nfull // LANES):  # through tmp: o may be y
        for u in range(LANES):
            tmp[u] = y[j * LANES + u] * rs * gamma[j * LANES + u]
        for u in range(LANES):
            o[j * LANES + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = y[j] * rs * gamma[j]


cdef inline floating silu_scalar(floating g) noexcept nogil:
    """g / (1 + exp(-g)) (fexpf gives inf beyond 88.7: the result is then -0; NaN stays NaN)."""
    if floating is float:
        return g / (<float>1.0 + fexpf(-g))
    else:
        return g / (1.0 + exp(-g))


def rms_norm(floating[:, ::1] out, const floating[:, ::1] x, const floating[::1] gamma, double eps):
    """out = x / sqrt(mean(x²) + eps) * gamma per row."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            rms_row(&out[r, 0], &x[r, 0], D, &gamma[0], eps)


cdef inline void add_row(floating* o, const floating* a, const floating* b, Py_ssize_t D) noexcept nogil:
    """o = a + b for one row; o may be b. Through a small buffer of this call's own (one per thread)."""
    cdef floating tmp[LANES]
    cdef Py_ssize_t jb, j, u, nfull = D - D % LANES
    for jb in range(nfull // LANES):
        j = jb * LANES
        for u in range(LANES):
            tmp[u] = a[j + u] + b[j + u]
        for u in range(LANES):
            o[j + u] = tmp[u]
    for j in range(nfull, D):
        o[j] = a[j] + b[j]


def add_rms_norm(floating[:, ::1] out_sum, floating[:, ::1] out_norm, const floating[:, ::1] x,
                 const floating[:, ::1] residual, const floating[::1] gamma, double eps):
    """out_sum = x + residual; out_norm = rms_norm(out_sum). out_sum may be residual."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r
    if R * D == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            add_row(&out_sum[r, 0], &x[r, 0], &residual[r, 0], D)
            rms_row(&out_norm[r, 0], &out_sum[r, 0], D, &gamma[0], eps)


cdef inline void silu_mul_row(floating* o, const floating* gate, const floating* up, Py_ssize_t F) noexcept nogil:
    """o = silu(gate) * up for one row, through a small buffer of this call's own (one per thread)."""
    cdef floating tmp[LANES]
    cdef Py_ssize_t jb, j, u, nfull = F - F % LANES
    for jb in range(nfull // LANES):
        j = jb * LANES
        for u in range(LANES):
            tmp[u] = silu_scalar(gate[j + u]) * up[j + u]
        for u in range(LANES):
            o[j + u] = tmp[u]
    for j in range(nfull, F):
        o[j] = silu_scalar(gate[j]) * up[j]


def silu_mul(floating[:, ::1] out, const floating[:, ::1] x):
    """out (R, F) = silu(x[:, :F]) * x[:, F:]."""
    cdef Py_ssize_t R = out.shape[0], F = out.shape[1], r
    if R * F == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            silu_mul_row(&out[r, 0], &x[r, 0], &x[r, F], F)


cdef inline void head_rope(floating* dst, const floating* src, const floating* bias, Py_ssize_t d,
                           const floating* gamma, double eps, bint has_norm, const floating* c,
                           const floating* s) noexcept nogil:
    """dst (d,) = RoPE(rms_norm?(src + bias)) with one token's angles c, s (d/2,)."""
    cdef Py_ssize_t e, h = d // 2
    cdef floating x1, x2
    for e in range(d):
        dst[e] = src[e] + bias[e]
    if has_norm:
        rms_row(dst, dst, d, gamma, eps)
    for e in range(h):
        x1 = dst[e]
        x2 = dst[e + h]
        dst[e] = x1 * c[e] - x2 * s[e]
        dst[e + h] = x2 * c[e] + x1 * s[e]


def split_qkv_rope(floating[:, :, :, ::1] q, floating[:, :, :, ::1] k, floating[:, :, :, ::1] v,
                   const floating[:, :, ::1] qkv, const floating[::1] bias, const floating[::1] q_gamma,
                   const floating[::1] k_gamma, double eps, bint has_norm, const floating[:, ::1] cos,
                   const floating[:, ::1] sin, Py_ssize_t offset):
    """qkv + bias (B, L, (Hq + 2 Hkv) d) into q (B, Hq, L, d) and k, v (B, Hkv, T, d) at rows offset + n; q and k
    optionally RMS-normalised per head, then rotated by the token's angles cos, sin (B·L, d/2)."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], d = q.shape[3], Hkv = k.shape[1]
    cdef Py_ssize_t w, b, n, h, e, lo
    cdef const floating* row
    cdef floating* dst
    if B * Hq * L * d == 0:
        return
    with nogil:
        for w in prange(B * L, schedule="static", num_threads=_n_threads):
            b = w // L
            n = w - b * L
            row = &qkv[b, n, 0]
            for h in range(Hq):
                head_rope(&q[b, h, n, 0], row + h * d, &bias[h * d], d, &q_gamma[0], eps, has_norm,
                          &cos[w, 0], &sin[w, 0])
            for h in range(Hkv):
                lo = (Hq + h) * d
                head_rope(&k[b, h, offset + n, 0], row + lo, &bias[lo], d, &k_gamma[0], eps, has_norm,
                          &cos[w, 0], &sin[w, 0])
                lo = (Hq + Hkv + h) * d
                dst = &v[b, h, offset + n, 0]
                for e in range(d):
                    dst[e] = row[lo + e] + bias[lo + e]


cdef inline floating dot_row(const floating* a, const floating* b, Py_ssize_t K) noexcept nogil:
    """sum a[k] b[k] in LANES partial sums (vectorised), combined at the end."""
    cdef floating acc[LANES]
    cdef floating total = 0
    cdef Py_ssize_t j, u, nfull = K - K % LANES
    for u in range(LANES):
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            acc[u] = acc[u] + a[j * LANES + u] * b[j * LANES + u]
    for j in range(nfull, K):
        total = total + a[j] * b[j]
    for u in range(LANES):
        total = total + acc[u]
    return total


def linear(floating[:, ::1] out, const floating[:, ::1] x, const floating[:, ::1] w):
    """out (T, N) = x (T, K) @ wᵀ, w (N, K): each output column is one thread's dot products (a decode step)."""
    cdef Py_ssize_t T = x.shape[0], K = x.shape[1], N = w.shape[0], n, t
    if T * N == 0:
        return
    if K == 0:
        out[:, :] = 0
        return
    with nogil:
        for n in prange(N, schedule="static", num_threads=_n_threads):
            for t in range(T):
                out[t, n] = dot_row(&x[t, 0], &w[n, 0], K)



# ----------------------------------------------------------------------------------------------------------------
# text_matmul: the real rows of each sequence times w, on the micro-kernel of the fused attention (_tile_gemm.h),
# which computes every element the same way wherever its row and column sit (the same vector FMAs, k in order): a
# row's bits depend on that row and w only, not on its batch, its place, the padding or the thread count (OpenBLAS
# gives a row other bits by its place in a matrix and by the thread split). Work items: blocks of _TM_ROWS token
# rows x _TM_COLS output columns, the column panels outermost so that a thread's items reuse w's panel (K x
# _TM_COLS) from its L2 cache; within an item, each sequence's run of real rows is one tile product. The Numba twin
# (kernels/numba/blocks.py) measured 96 x 128 within a few % of the best shape tried on a 2-core AMD EPYC (Zen 5).
# ----------------------------------------------------------------------------------------------------------------
cdef extern from "_tile_gemm.h" nogil:
    void fa_tile_gemm_f(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, float alpha, const float* a, Py_ssize_t a_rs,
                        Py_ssize_t a_cs, const float* b, Py_ssize_t ldb, float* c, Py_ssize_t ldc)
    void fa_tile_gemm_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, double alpha, const double* a, Py_ssize_t a_rs,
                        Py_ssize_t a_cs, const double* b, Py_ssize_t ldb, double* c, Py_ssize_t ldc)

cdef Py_ssize_t _TM_ROWS = 96
cdef Py_ssize_t _TM_COLS = 128


def text_matmul(floating[:, :, ::1] out, const floating[:, :, ::1] x, const floating[:, ::1] w,
                const int64_t[::1] lengths):
    """out[b, :n] = x[b, :n] @ w for n = lengths[b]; rows past n are left as they are."""
    cdef Py_ssize_t B = x.shape[0], N = x.shape[1], K = x.shape[2], F = w.shape[1]
    cdef Py_ssize_t T = B * N, n_rows, n_cols, item, i0, i1, j0, j1, r, b, slot_end, real_end
    if T == 0 or F == 0:
        return
    if K == 0:
        for b in range(B):
            out[b, :lengths[b], :] = 0
        return
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* wp = &w[0, 0]
    cdef floating* op = &out[0, 0, 0]
    n_rows = (T + _TM_ROWS - 1) // _TM_ROWS
    n_cols = (F + _TM_COLS - 1) // _TM_COLS
    with nogil:
        for item in prange(n_rows * n_cols, schedule="static", num_threads=_n_threads):
            i0 = (item % n_rows) * _TM_ROWS
            j0 = (item // n_rows) * _TM_COLS
            i1 = min(T, i0 + _TM_ROWS)
            j1 = min(F, j0 + _TM_COLS)
            r = i0
            while r < i1:
                b = r // N
                slot_end = min(i1, (b + 1) * N)
                real_end = min(slot_end, b * N + lengths[b])
                if r < real_end:
                    if floating is float:
                        fa_tile_gemm_f(real_end - r, j1 - j0, K, 1.0, xp + r * K, K, 1, wp + j0, F,
                                       op + r * F + j0, F)
                    else:
                        fa_tile_gemm_d(real_end - r, j1 - j0, K, 1.0, xp + r * K, K, 1, wp + j0, F,
                                       op + r * F + j0, F)
                r = slot_end


# ----------------------------------------------------------------------------------------------------------------
# Backward kernels (training). Contract: the backward section of fastattn/_numpy_blocks.py.
# Sums over rows (grad_gamma, grad_beta, grad_bias) run in parallel over blocks of COLS columns, each column summed
# over the rows in increasing order in double: no races, bitwise the same for any thread count.
# ----------------------------------------------------------------------------------------------------------------
from libc.math cimport log
from libc.stdlib cimport malloc

cdef enum:
    COLS = 32


cdef inline floating gelu_grad_scalar(floating y) noexcept nogil:
    """d/dy 0.5 y (1 + erf(y/√2)) = Φ(y) + y φ(y)."""
    if floating is float:
        return (<float>0.5 * (<float>1.0 + erf_f32(y * <float>0.7071067811865476))
                + y * fexpf_neg(<float>-0.5 * y * y) * <float>0.3989422804014327)
    else:
        return 0.5 * (1.0 + erf(y * 0.7071067811865476)) + y * exp(-0.5 * y * y) * 0.3989422804014327


cdef inline floating gelu_tanh_grad_scalar(floating y) noexcept nogil:
    """d/dy 0.5 y (1 + tanh u) = s + 2 y s (1 - s) du/dy with s = 1 / (1 + e), e = exp(-2u)."""
    cdef floating y2 = y * y
    cdef floating u = <floating>0.7978845608028654 * (y + <floating>0.044715 * y2 * y)
    cdef floating du = <floating>0.7978845608028654 * (<floating>1.0 + <floating>0.134145 * y2)
    cdef floating t = <floating>-2.0 * u
    cdef floating s, s_neg
    cdef floating hi = <floating>80.0   # exponents clamped: no intermediate overflows
    if floating is float:
        s = <float>1.0 / (<float>1.0 + fexpf(t if t < hi else hi))
        s_neg = <float>1.0 / (<float>1.0 + fexpf(-t if -t < hi else hi))   # 1 - s without cancellation
    else:
        s = 1.0 / (1.0 + exp(t if t < hi else hi))
        s_neg = 1.0 / (1.0 + exp(-t if -t < hi else hi))
    return s + <floating>2.0 * y * (s * s_neg) * du


cdef inline void _ln_param_block(floating* grad_gamma, floating* grad_beta, const floating* grad_out,
                                 const floating* x, const double* stats, Py_ssize_t R, Py_ssize_t D,
                                 Py_ssize_t lo) noexcept nogil:
    """Columns lo .. lo + COLS - 1 of grad_gamma = Σ_r grad_out x̂ and grad_beta = Σ_r grad_out (rows in order)."""
    cdef double acc_g[COLS]
    cdef double acc_b[COLS]
    cdef Py_ssize_t hi = lo + COLS if lo + COLS < D else D, r, c
    cdef double mean, rstd
    for c in range(COLS):
        acc_g[c] = 0.0
        acc_b[c] = 0.0
    for r in range(R):
        mean = stats[2 * r]
        rstd = stats[2 * r + 1]
        for c in range(lo, hi):
            acc_g[c - lo] += grad_out[r * D + c] * ((x[r * D + c] - mean) * rstd)
            acc_b[c - lo] += grad_out[r * D + c]
    for c in range(lo, hi):
        grad_gamma[c] = <floating>acc_g[c - lo]
        grad_beta[c] = <floating>acc_b[c - lo]


cdef inline void _bias_block(floating* grad_bias, const floating* grad_out, Py_ssize_t R, Py_ssize_t D,
                             Py_ssize_t lo) noexcept nogil:
    """Columns lo .. lo + COLS - 1 of grad_bias = Σ_r grad_out (rows in order, in double)."""
    cdef double acc[COLS]
    cdef Py_ssize_t hi = lo + COLS if lo + COLS < D else D, r, c
    for c in range(COLS):
        acc[c] = 0.0
    for r in range(R):
        for c in range(lo, hi):
            acc[c - lo] += grad_out[r * D + c]
    for c in range(lo, hi):
        grad_bias[c] = <floating>acc[c - lo]


def layer_norm_backward(floating[:, ::1] grad_x, floating[::1] grad_gamma, floating[::1] grad_beta,
                        const floating[:, ::1] grad_out, const floating[:, ::1] x, const floating[::1] gamma,
                        double eps, const floating[:, ::1] grad_residual, bint has_residual):
    """LayerNorm's gradients; grad_x may be grad_out or grad_residual (the parameter sums run first)."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r, j, blk
    cdef Py_ssize_t nblocks = (D + COLS - 1) // COLS
    cdef double total, sq, cc, mean, rstd, s1, s2, m1, m2, g
    cdef const floating* xr
    cdef const floating* go
    cdef floating* gx
    cdef double* stats
    if D == 0:
        return
    if R == 0:
        grad_gamma[:] = 0
        grad_beta[:] = 0
        return
    stats = <double*>malloc(2 * R * sizeof(double))
    if stats == NULL:
        raise MemoryError()
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):  # mean and 1/std of each row
            xr = &x[r, 0]
            total = 0.0
            for j in range(D):
                total = total + xr[j]
            mean = total / D
            sq = 0.0
            for j in range(D):
                cc = xr[j] - mean
                sq = sq + cc * cc
            stats[2 * r] = mean
            stats[2 * r + 1] = 1.0 / sqrt(sq / D + eps)
        for blk in prange(nblocks, schedule="static", num_threads=_n_threads):  # Σ_r grad_out x̂, Σ_r grad_out
            _ln_param_block(&grad_gamma[0], &grad_beta[0], &grad_out[0, 0], &x[0, 0], stats, R, D, blk * COLS)
        for r in prange(R, schedule="static", num_threads=_n_threads):  # grad_x, row by row, in double
            xr = &x[r, 0]
            go = &grad_out[r, 0]
            gx = &grad_x[r, 0]
            mean = stats[2 * r]
            rstd = stats[2 * r + 1]
            s1 = 0.0
            s2 = 0.0
            for j in range(D):
                g = <double>go[j] * gamma[j]
                s1 = s1 + g
                s2 = s2 + g * ((xr[j] - mean) * rstd)
            m1 = s1 / D
            m2 = s2 / D
            if has_residual:
                for j in range(D):
                    gx[j] = <floating>(rstd * (<double>go[j] * gamma[j] - m1 - (xr[j] - mean) * rstd * m2)
                                       + grad_residual[r, j])
            else:
                for j in range(D):
                    gx[j] = <floating>(rstd * (<double>go[j] * gamma[j] - m1 - (xr[j] - mean) * rstd * m2))
    free(stats)


cdef int _gelu_grad_rows(floating[:, ::1] grad_x, const floating[:, ::1] grad_out, const floating[:, ::1] x,
                         const floating* bias, int form) except -1:
    """grad_x = grad_out * gelu'(x + bias) (erf or tanh form); bias NULL: no bias. grad_x may be grad_out."""
    cdef Py_ssize_t R = x.shape[0], D = x.shape[1], r, c
    cdef floating* zeros = NULL
    cdef floating* gx
    cdef const floating* go
    cdef const floating* xr
    if R * D == 0:
        return 0
    if bias == NULL:
        zeros = <floating*>calloc(D, sizeof(floating))
        if zeros == NULL:
            raise MemoryError()
        bias = zeros
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            gx = &grad_x[r, 0]
            go = &grad_out[r, 0]
            xr = &x[r, 0]
            if form == GELU_TANH:
                for c in range(D):
                    gx[c] = go[c] * gelu_tanh_grad_scalar(xr[c] + bias[c])
            else:
                for c in range(D):
                    gx[c] = go[c] * gelu_grad_scalar(xr[c] + bias[c])
    free(zeros)
    return 0


def gelu_backward(floating[:, ::1] grad_x, const floating[:, ::1] grad_out, const floating[:, ::1] x):
    """grad_x = grad_out * gelu'(x) (erf form)."""
    _gelu_grad_rows(grad_x, grad_out, x, <const floating*>NULL, GELU_ERF)


def gelu_tanh_backward(floating[:, ::1] grad_x, const floating[:, ::1] grad_out, const floating[:, ::1] x):
    """grad_x = grad_out * gelu_tanh'(x)."""
    _gelu_grad_rows(grad_x, grad_out, x, <const floating*>NULL, GELU_TANH)


def bias_gelu_backward(floating[:, ::1] grad_x, const floating[:, ::1] grad_out, const floating[:, ::1] x,
                       const floating[::1] bias):
    """grad_x = grad_out * gelu'(x + bias)."""
    if x.shape[0] * x.shape[1] != 0:
        _gelu_grad_rows(grad_x, grad_out, x, &bias[0], GELU_ERF)


def bias_gelu_tanh_backward(floating[:, ::1] grad_x, const floating[:, ::1] grad_out, const floating[:, ::1] x,
                            const floating[::1] bias):
    """grad_x = grad_out * gelu_tanh'(x + bias)."""
    if x.shape[0] * x.shape[1] != 0:
        _gelu_grad_rows(grad_x, grad_out, x, &bias[0], GELU_TANH)


def bias_backward(floating[::1] grad_bias, const floating[:, ::1] grad_out):
    """grad_bias[c] = Σ_r grad_out[r, c], rows in order, in double."""
    cdef Py_ssize_t R = grad_out.shape[0], D = grad_out.shape[1], blk
    cdef Py_ssize_t nblocks = (D + COLS - 1) // COLS
    if D == 0:
        return
    if R == 0:
        grad_bias[:] = 0
        return
    with nogil:
        for blk in prange(nblocks, schedule="static", num_threads=_n_threads):
            _bias_block(&grad_bias[0], &grad_out[0, 0], R, D, blk * COLS)


def split_qkv_backward(floating[:, :, ::1] grad_qkv, const floating[:, :, :, ::1] grad_q,
                       const floating[:, :, :, ::1] grad_k, const floating[:, :, :, ::1] grad_v):
    """grad_q, grad_k, grad_v (B, H, L, d) -> grad_qkv (B, L, 3·H·d)."""
    cdef Py_ssize_t B = grad_q.shape[0], H = grad_q.shape[1], L = grad_q.shape[2], d = grad_q.shape[3]
    cdef Py_ssize_t HD = H * d, w, b, n, h, e
    cdef floating* row
    if B * H * L * d == 0:
        return
    with nogil:
        for w in prange(B * L, schedule="static", num_threads=_n_threads):
            b = w // L
            n = w - b * L
            row = &grad_qkv[b, n, 0]
            for h in range(H):
                for e in range(d):
                    row[h * d + e] = grad_q[b, h, n, e]
                for e in range(d):
                    row[HD + h * d + e] = grad_k[b, h, n, e]
                for e in range(d):
                    row[2 * HD + h * d + e] = grad_v[b, h, n, e]


def merge_heads_backward(floating[:, :, :, ::1] grad_o, const floating[:, :, ::1] grad_out):
    """grad_out (B, L, H·d) -> grad_o (B, H, L, d)."""
    cdef Py_ssize_t B = grad_o.shape[0], H = grad_o.shape[1], L = grad_o.shape[2], d = grad_o.shape[3]
    cdef Py_ssize_t w, b, n, h, e
    if B * H * L * d == 0:
        return
    with nogil:
        for w in prange(B * L, schedule="static", num_threads=_n_threads):
            b = w // L
            n = w - b * L
            for h in range(H):
                for e in range(d):
                    grad_o[b, h, n, e] = grad_out[b, n, h * d + e]


def cross_entropy(floating[::1] loss, floating[:, ::1] grad_logits, const floating[:, ::1] logits,
                  const int64_t[::1] labels, double scale):
    """Per row: loss = logsumexp - logit[label]; grad = scale (softmax - onehot); label < 0: 0 and 0.

    grad_logits may be logits: the row is copied into grad_logits (unless it is the same memory), the exps are
    written in place there by exp_shift_sum (sum in double), then scaled.
    """
    cdef Py_ssize_t R = logits.shape[0], Vn = logits.shape[1], r, j
    cdef int64_t label
    cdef double m, total
    cdef floating picked, inv
    cdef const floating* z
    cdef floating* g
    if R == 0:
        return
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            z = &logits[r, 0]
            g = &grad_logits[r, 0]
            label = labels[r]
            if label < 0:
                loss[r] = 0
                for j in range(Vn):
                    g[j] = 0
                continue
            m = row_max(z, Vn)
            picked = z[label]
            if <const floating*>g != z:
                for j in range(Vn):
                    g[j] = z[j]
            total = exp_shift_sum(g, Vn, m)
            loss[r] = <floating>((m - picked) + log(total))
            inv = <floating>(scale / total)
            for j in range(Vn):
                g[j] = g[j] * inv
            g[label] = g[label] - <floating>scale
