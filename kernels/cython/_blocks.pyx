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
