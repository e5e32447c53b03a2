# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# fastattn: isa-variants
"""Attention kernels: scores, softmax, weighted_sum (the stages) and attention (fused, flash-style).

Contract: kernels/README.md. Arrays are C-contiguous except `mask` (B, Hq, L, S) and `key_bias` (B, S), which
may be read-only broadcast views (zero strides): they are read through their strides, and never when
has_mask / has_key_bias is False.

Tile products. `_gemm_nt` (scores = Q·Kᵀ) and `_gemm_nn` (P·V) run one of three ways (TILES_*, chosen per
process: FASTATTN_CYTHON_TILES, _set_tile_products; tile_products() reports it):
  micro (default)  the register-blocked micro-kernel of _tile_gemm.h: C with vector extensions, 6×64 float32 blocks
                   in AVX-512 registers in the avx512 build (6×16 with AVX2, 6×8 with SSE2). Kᵀ is packed once per
                   key tile, with rows an odd number of cache lines apart. ~360 GFLOP/s on 2 AVX-512 cores at N=4096.
  blas             sgemm/dgemm taken from scipy.linalg.cython_blas at run time, single-threaded inside the OpenMP
                   region (see _blas.py); the loops serve calls too small for it (_BLAS_MIN_WORK) or when SciPy is
                   missing. Loading it sets SciPy's OpenBLAS to one thread for the whole process. ~195 GFLOP/s.
  loops            the plain loops below, the readable reference. ~60 GFLOP/s.
All three give the same results up to rounding (the tests run each against the oracle).

Wide accumulation. float32 products stay float32 (micro-kernel and sgemm; in the loops, groups of 4 products summed
in float32), but every long sum is kept in double: softmax row sums (exp_shift_sum), the fused kernel's running row
sums and output rows (one float32 tile product per key tile, added into a double running weighted average, which
also keeps huge values in V from overflowing), and weighted_sum (float32 products on chunks of BK keys added up in
double). One heavy weight must not swallow many light ones.
"""

from cython.parallel cimport parallel, prange
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport INFINITY, exp, fabs, fabsf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

include "_common.pxi"

cdef extern from "_tile_gemm.h" nogil:
    const int FA_TILE_GEMM_VECTORS, FA_VEC_BYTES, FA_MR, FA_NV
    void fa_tile_gemm_f(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, float alpha, const float* a, Py_ssize_t a_rs,
                        Py_ssize_t a_cs, const float* b, Py_ssize_t ldb, float* c, Py_ssize_t ldc)
    void fa_tile_gemm_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, double alpha, const double* a, Py_ssize_t a_rs,
                        Py_ssize_t a_cs, const double* b, Py_ssize_t ldb, double* c, Py_ssize_t ldc)


cdef inline void _micro_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha, const floating* a,
                             Py_ssize_t a_rs, Py_ssize_t a_cs, const floating* b, Py_ssize_t ldb, floating* c,
                             Py_ssize_t ldc) noexcept nogil:
    """c = alpha·(a @ b) with the register-blocked micro-kernel of _tile_gemm.h (a: any strides; b, c: rows)."""
    if floating is float:
        fa_tile_gemm_f(m, n, k, alpha, a, a_rs, a_cs, b, ldb, c, ldc)
    else:
        fa_tile_gemm_d(m, n, k, alpha, a, a_rs, a_cs, b, ldb, c, ldc)


# ---------------------------------------------------------------------------------------------------------------
# BLAS (the tile products of TILES_BLAS)
# ---------------------------------------------------------------------------------------------------------------

ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k, float *alpha, float *a, int *lda,
                         float *b, int *ldb, float *beta, float *c, int *ldc) noexcept nogil
ctypedef void (*dgemm_t)(char *transa, char *transb, int *m, int *n, int *k, double *alpha, double *a,
                         int *lda, double *b, int *ldb, double *beta, double *c, int *ldc) noexcept nogil
ctypedef void (*set_threads_t)(int n) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil

cdef sgemm_t _sgemm = NULL
cdef dgemm_t _dgemm = NULL
cdef set_threads_t _blas_set_threads = NULL
cdef get_threads_t _blas_get_threads = NULL
cdef bint _blas_tried = False
_blas_status = "not loaded yet (BLAS is loaded on the first call large enough to use it)"

# Tile products (see the module docstring): TILES_MICRO (the default), TILES_BLAS or TILES_LOOPS, per
# FASTATTN_CYTHON_TILES through _set_tile_products. Each has its own tile shape (query rows BQ × keys BK), measured
# on a 2-core AVX-512 machine, float32, B=1 H=12 d=64, N = 1024 and 4096 (_set_tiles tries others):
#   micro  256×512: 1.08-1.20× the Numba backend's speed (192×384: 1.0-1.09×, 128×256: 0.88-1.05×)
#   blas   256×512: ~90 GFLOP/s per core against ~83 for 128×512 (OpenBLAS packs each K/V tile once per query tile:
#                   taller query tiles pack less)
#   loops  64×128
cdef enum:
    TILES_LOOPS = 0
    TILES_BLAS = 1
    TILES_MICRO = 2

_TILE_NAMES = ("loops", "blas", "micro")
cdef int _tiles_wanted = TILES_MICRO
cdef Py_ssize_t _TILE_BQ[3]
cdef Py_ssize_t _TILE_BK[3]
_TILE_BQ[:] = [64, 256, 256]
_TILE_BK[:] = [128, 512, 512]
# BLAS: a call whose multiply-adds (B·Hq·L·S·(E+Ev)) are fewer than this uses the loops (measured: BLAS wins from
# ~6e6, e.g. 12 heads of 64×64); the first call above it loads SciPy's BLAS (~0.03 s, see _blas.py).
cdef double _BLAS_MIN_WORK = 1 << 22
cdef Py_ssize_t _BLAS_MIN_ROWS = 8   # fewer queries (decoding one token): the loops beat a gemm of 1 row
cdef Py_ssize_t _MIN_ITEMS = 8   # query tiles shrink (down to 32 rows) until there are this many work items


cdef struct Plan:
    int tiles            # TILES_*
    Py_ssize_t BQ, BK    # query rows, keys per tile


cdef Plan _plan(double work, Py_ssize_t rows, Py_ssize_t largest_dim, Py_ssize_t n_bh) except *:
    """How one call multiplies its tiles, and their shape. BLAS (when asked for) falls back to the loops for a
    small call or when SciPy's BLAS does not load; the query tile shrinks for a short call (_query_tile)."""
    cdef Plan plan
    plan.tiles = _tiles_wanted
    if plan.tiles == TILES_BLAS and not _use_blas(work, rows, largest_dim):
        plan.tiles = TILES_LOOPS
    plan.BQ = _query_tile(_TILE_BQ[plan.tiles], n_bh, rows)
    plan.BK = _TILE_BK[plan.tiles]
    if plan.tiles == TILES_BLAS:
        _blas_one_thread()
    return plan


cdef Py_ssize_t _query_tile(Py_ssize_t BQ, Py_ssize_t n_bh, Py_ssize_t L) noexcept:
    """BQ, halved while there are fewer than _MIN_ITEMS work items (n_bh heads × query tiles), so that a short
    call still spreads over the threads. It depends on the shapes only: results do not depend on thread count."""
    while BQ > 32 and n_bh * ((L + BQ - 1) // BQ) < _MIN_ITEMS:
        BQ //= 2
    return BQ


def _load_blas():
    """Take sgemm/dgemm from scipy.linalg.cython_blas and OpenBLAS's thread knob; record why not in _blas_status."""
    global _sgemm, _dgemm, _blas_set_threads, _blas_get_threads, _blas_tried, _blas_status
    _blas_tried = True
    from . import _blas
    reason = _blas.disabled_reason()
    if reason is not None:
        _blas_status = reason
        return
    try:
        s_cap, d_cap = _blas.gemm_capsules()
    except (ImportError, KeyError, AttributeError) as exc:
        _blas_status = f"unavailable, the kernels use their own loops (scipy.linalg.cython_blas: {exc})"
        return
    _sgemm = <sgemm_t>PyCapsule_GetPointer(s_cap, PyCapsule_GetName(s_cap))
    _dgemm = <dgemm_t>PyCapsule_GetPointer(d_cap, PyCapsule_GetName(d_cap))
    api = _blas.openblas_thread_api()
    if api is None:
        _blas_status = "scipy.linalg.cython_blas (no OpenBLAS thread control found: BLAS threads not limited)"
    else:
        _blas_set_threads = <set_threads_t><size_t>api[0]
        _blas_get_threads = <get_threads_t><size_t>api[1]
        _blas_one_thread()
        _blas_status = (f"scipy.linalg.cython_blas, OpenBLAS {api[2]} set to 1 thread for the whole process "
                        "(see fastattn.kernels.cython._blas)")


def _set_blas_min_work(double work):
    """Set the size from which BLAS is used (0: always, inf: never); returns the previous one. For tests."""
    global _BLAS_MIN_WORK
    previous = _BLAS_MIN_WORK
    _BLAS_MIN_WORK = work
    return previous


def _set_tiles(str tiles, Py_ssize_t bq, Py_ssize_t bk):
    """Set the tile shape (query rows, keys) of one kind of tile product; returns the previous one. For tuning."""
    cdef int t = _TILE_NAMES.index(tiles)
    if bq < 1 or bk < 1:
        raise ValueError(f"_set_tiles: tile sizes must be >= 1, got {bq}×{bk}")
    previous = (_TILE_BQ[t], _TILE_BK[t])
    _TILE_BQ[t], _TILE_BK[t] = bq, bk
    return previous


def _set_tile_products(str tiles):
    """Multiply tiles with "micro" (the register-blocked micro-kernel, default), "blas" (SciPy's BLAS, the loops
    for small calls) or "loops" (the readable loops) from now on; returns the previous choice."""
    global _tiles_wanted
    if tiles not in _TILE_NAMES:
        raise ValueError(f"tile products must be one of {', '.join(_TILE_NAMES)}, got {tiles!r}")
    previous = _TILE_NAMES[_tiles_wanted]
    _tiles_wanted = _TILE_NAMES.index(tiles)
    return previous


def tile_products():
    """How the attention kernels multiply tiles: the choice, and what it runs on."""
    name = _TILE_NAMES[_tiles_wanted]
    if _tiles_wanted == TILES_MICRO:
        if not FA_TILE_GEMM_VECTORS:
            return "micro: plain C loops (this compiler has no vector extensions)"
        return (f"micro: register-blocked micro-kernel, {FA_MR}×{FA_NV * FA_VEC_BYTES // 4} float32 / "
                f"{FA_MR}×{FA_NV * FA_VEC_BYTES // 8} float64 blocks in {FA_VEC_BYTES}-byte vectors")
    if _tiles_wanted == TILES_BLAS:
        return f"blas: {_blas_status}"
    return "loops: the plain loops"


def blas_status():
    """How the tile products run: which BLAS, or why the loops."""
    return _blas_status


cdef bint _use_blas(double work, Py_ssize_t rows, Py_ssize_t largest_dim) except -1:
    """BLAS for this call? Large enough, dimensions that fit BLAS's 32-bit ints, and SciPy's BLAS loads."""
    if work < _BLAS_MIN_WORK or rows < _BLAS_MIN_ROWS or largest_dim > 0x7FFFFFFF:
        return False
    if not _blas_tried:
        _load_blas()
    return _sgemm != NULL


cdef inline void _blas_one_thread() noexcept nogil:
    """Set SciPy's OpenBLAS to one thread, for the whole process and for good (see _blas.py).

    Done when BLAS is loaded and checked again before each kernel that calls it (two cheap calls), so that a
    later change of the count by someone else cannot make the kernels oversubscribe. Never restored: a
    save-and-restore around each call is process-wide too and races when two Python threads run kernels.
    """
    if _blas_set_threads != NULL and _blas_get_threads() != 1:
        _blas_set_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# Tile products (row-major). BLAS is column-major: a row-major C = A·B is the column-major Cᵀ = Bᵀ·Aᵀ.
# ---------------------------------------------------------------------------------------------------------------

cdef inline int _i(Py_ssize_t n) noexcept nogil:
    return <int>(n if n > 1 else 1)   # BLAS wants leading dimensions >= 1, even for empty tiles


cdef void _gemm_nt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha, const floating* a, Py_ssize_t lda,
                   const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc, floating* bt,
                   int tiles) noexcept nogil:
    """c[i, j] = alpha · Σ_e a[i, e]·b[j, e] for i < m, j < n (C = alpha·A·Bᵀ).

    bt: scratch for k·(n + 32) entries of floating and then n doubles (micro-kernel and loops).
    """
    cdef char trans = b'T', notrans = b'N'
    cdef int im = <int>m, jn = <int>n, ek = <int>k, ilda = _i(lda), ildb = _i(ldb), ildc = _i(ldc)
    cdef floating zero = 0
    cdef Py_ssize_t i, j, e
    cdef double ae
    cdef floating* crow
    cdef const floating* btrow
    cdef double* acc
    if tiles == TILES_BLAS:
        if floating is float:
            _sgemm(&trans, &notrans, &jn, &im, &ek, &alpha, <float*>b, &ildb, <float*>a, &ilda, &zero, c, &ildc)
        else:
            _dgemm(&trans, &notrans, &jn, &im, &ek, &alpha, <double*>b, &ildb, <double*>a, &ilda, &zero, c, &ildc)
        return
    cdef Py_ssize_t ldt = n, line = 64 // sizeof(floating)   # items per cache line
    if tiles == TILES_MICRO:
        # bt = Bᵀ (k×n) with rows ldt apart, ldt an odd number of cache lines: the micro-kernel walks down the k
        # rows of a panel, and rows a power of two of bytes apart (n = 512 floats: 2 KiB) would all fall into a few
        # sets of the L1 cache and evict each other (measured: 192×512 tiles at half the speed of 192×384).
        ldt = (n + line - 1) // line
        ldt = (ldt + 1 - ldt % 2) * line
        for j in range(n):
            for e in range(k):
                bt[e * ldt + j] = b[j * ldb + e]
        _micro_gemm(m, n, k, alpha, a, lda, 1, bt, ldt, c, ldc)
        return
    # transpose B once (bt = Bᵀ, k×n), so that the product runs along contiguous rows of bt
    for j in range(n):
        for e in range(k):
            bt[e * n + j] = b[j * ldb + e]
    # loops: the innermost loop runs along a row of bt (vectorises, no reduction); the dot products (E terms) are
    # summed in double, then scaled: as accurate as a pairwise float32 sum
    acc = <double*>((<size_t>(bt + k * n) + 7) & ~(<size_t>7))   # n doubles after the transposed B
    for i in range(m):
        crow = c + i * ldc
        for j in range(n):
            acc[j] = 0
        for e in range(k):
            ae = a[i * lda + e]
            btrow = bt + e * n
            for j in range(n):
                acc[j] = acc[j] + ae * btrow[j]
        for j in range(n):
            crow[j] = <floating>(alpha * acc[j])


cdef void _gemm_nn(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
                   const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc, double* acc,
                   int tiles) noexcept nogil:
    """c[i, j] = Σ_e a[i, e]·b[e, j] for i < m, j < n (C = A·B).

    acc: scratch for n doubles (loops only). The loops sum in double: groups of 4 terms in the dtype, then added
    into double, so that the error stays within a few 2^-24 of Σ|a·b| however long the sum (a float32 running
    sum would let one heavy term swallow many light ones).
    """
    cdef char notrans = b'N'
    cdef int im = <int>m, jn = <int>n, ek = <int>k, ilda = _i(lda), ildb = _i(ldb), ildc = _i(ldc)
    cdef floating one = 1, zero = 0
    cdef Py_ssize_t i, j, e
    cdef double ae
    cdef floating a0, a1, a2, a3
    cdef floating* crow
    cdef const floating* b0
    cdef const floating* b1
    cdef const floating* b2
    cdef const floating* b3
    if tiles == TILES_MICRO:
        _micro_gemm(m, n, k, 1, a, lda, 1, b, ldb, c, ldc)
        return
    if tiles == TILES_BLAS:
        if floating is float:
            _sgemm(&notrans, &notrans, &jn, &im, &ek, &one, <float*>b, &ildb, <float*>a, &ilda, &zero, c, &ildc)
        else:
            _dgemm(&notrans, &notrans, &jn, &im, &ek, &one, <double*>b, &ildb, <double*>a, &ilda, &zero, c, &ildc)
        return
    for i in range(m):
        crow = c + i * ldc
        for j in range(n):
            acc[j] = 0
        e = 0
        while e + 4 <= k:                    # 4 terms summed in the dtype (whole-vector FMAs), then in double
            a0, a1, a2, a3 = a[i * lda + e], a[i * lda + e + 1], a[i * lda + e + 2], a[i * lda + e + 3]
            b0 = b + e * ldb
            b1 = b0 + ldb
            b2 = b1 + ldb
            b3 = b2 + ldb
            for j in range(n):
                acc[j] = acc[j] + <double>(a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j])
            e += 4
        while e < k:
            ae = a[i * lda + e]
            b0 = b + e * ldb
            for j in range(n):
                acc[j] = acc[j] + ae * b0[j]
            e += 1
        for j in range(n):
            crow[j] = <floating>acc[j]


# ---------------------------------------------------------------------------------------------------------------
# Masking one row of scores: s[j0:j0+n] of query i
# ---------------------------------------------------------------------------------------------------------------

cdef struct Masks:
    bint causal
    Py_ssize_t causal_offset
    const char* mask           # NULL when has_mask is False; else &mask[0, 0, 0, 0], strides in bytes below
    Py_ssize_t ms0, ms1, ms2, ms3
    const char* key_bias       # NULL when has_key_bias is False
    Py_ssize_t ks0, ks1


cdef inline void _mask_row(floating* srow, Py_ssize_t n, Py_ssize_t b, Py_ssize_t h, Py_ssize_t i,
                           Py_ssize_t j0, const Masks* mk) noexcept nogil:
    """s[i, j0 + c] += mask[b, h, i, j0 + c] + key_bias[b, j0 + c] (those present); causal hidden -> -inf."""
    cdef Py_ssize_t c, first_hidden
    cdef const char* mrow
    cdef const char* krow
    if mk.mask != NULL:
        mrow = mk.mask + b * mk.ms0 + h * mk.ms1 + i * mk.ms2 + j0 * mk.ms3
        for c in range(n):
            srow[c] = srow[c] + (<const floating*>(mrow + c * mk.ms3))[0]
    if mk.key_bias != NULL:
        krow = mk.key_bias + b * mk.ks0 + j0 * mk.ks1
        for c in range(n):
            srow[c] = srow[c] + (<const floating*>(krow + c * mk.ks1))[0]
    if mk.causal:
        first_hidden = i + mk.causal_offset + 1 - j0     # key j is visible iff j <= i + causal_offset
        if first_hidden < 0:
            first_hidden = 0
        for c in range(first_hidden, n):
            srow[c] = -INFINITY


cdef inline Py_ssize_t _visible_end(Py_ssize_t i_last, Py_ssize_t S, const Masks* mk) noexcept nogil:
    """Keys [0, end) can be visible to queries up to i_last (all S unless causal)."""
    cdef Py_ssize_t end = S
    if mk.causal:
        end = i_last + mk.causal_offset + 1
        end = 0 if end < 0 else (S if end > S else end)
    return end


cdef int _masks_from(Masks* mk, bint causal, Py_ssize_t causal_offset, const floating[:, :, :, :] mask,
                     bint has_mask, const floating[:, :] key_bias, bint has_key_bias) except -1:
    mk.causal = causal
    mk.causal_offset = causal_offset
    mk.mask = NULL
    mk.key_bias = NULL
    if has_mask:
        mk.mask = <const char*>&mask[0, 0, 0, 0]
        mk.ms0, mk.ms1, mk.ms2, mk.ms3 = mask.strides[0], mask.strides[1], mask.strides[2], mask.strides[3]
    if has_key_bias:
        mk.key_bias = <const char*>&key_bias[0, 0]
        mk.ks0, mk.ks1 = key_bias.strides[0], key_bias.strides[1]
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Stage kernels
# ---------------------------------------------------------------------------------------------------------------

def scores(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
           double scale, bint causal, Py_ssize_t causal_offset, const floating[:, :, :, :] mask, bint has_mask,
           const floating[:, :] key_bias, bint has_key_bias):
    """out[b, h, i, j] = scale·⟨q[b, h, i], k[b, h // g, j]⟩ (+ mask) (+ key_bias); causal hidden -> -inf."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2]
    if B * Hq * L * S == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * E, L, max(L, S, E), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ, BK = plan.BK
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ
    cdef floating alpha = <floating>scale
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, b, h, i0, nq, jt, j0, nk, r, c, end
    cdef floating* srow
    cdef floating* bt = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        if tiles != TILES_BLAS:
            bt = <floating*>malloc(E * (BK + 32) * sizeof(floating) + BK * sizeof(double) + 64)
        for w in prange(B * Hq * n_qt, schedule="dynamic"):
            if bt == NULL and tiles != TILES_BLAS:
                failed_flag[0] = 1
                continue
            b = w // (Hq * n_qt)
            h = (w // n_qt) % Hq
            i0 = (w % n_qt) * BQ
            nq = min(BQ, L - i0)
            end = _visible_end(i0 + nq - 1, S, &mk)
            for jt in range((end + BK - 1) // BK):  # scale·QKᵀ on the key tiles that can be visible
                j0 = jt * BK
                nk = min(BK, end - j0)
                _gemm_nt(nq, nk, E, alpha, qp + ((b * Hq + h) * L + i0) * E, E,
                         kp + (b * Hkv + h // group) * S * E + j0 * E, E,
                         op + ((b * Hq + h) * L + i0) * S + j0, S, bt, tiles)
            for r in range(nq):                     # masks; the keys past `end` are hidden
                srow = op + ((b * Hq + h) * L + i0 + r) * S
                _mask_row(srow, end, b, h, i0 + r, 0, &mk)
                for c in range(end, S):
                    srow[c] = -INFINITY
        free(bt)
    if failed:
        raise MemoryError("scores: no memory for the per-thread tile buffers")


def softmax(floating[:, ::1] out, const floating[:, ::1] s):
    """out[r] = exp(s[r] - max) / sum, row by row; a row of -inf gives zeros. out may be s itself."""
    cdef Py_ssize_t R = s.shape[0], S = s.shape[1], r, c
    if R * S == 0:
        return
    cdef floating* orow
    cdef const floating* srow
    cdef double mx, total
    cdef floating inv
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            orow = &out[r, 0]
            srow = &s[r, 0]
            if <const floating*>orow != srow:
                memcpy(orow, srow, S * sizeof(floating))
            mx = row_max(orow, S)
            total = exp_shift_sum(orow, S, mx if mx != -INFINITY else 0.0)  # NaN stays: exp(NaN) = NaN
            if total == 0:                   # every score -inf: no key to attend to
                memset(orow, 0, S * sizeof(floating))
            else:
                inv = <floating>(1.0 / total)
                for c in range(S):
                    orow[c] = orow[c] * inv


def weighted_sum(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] p, const floating[:, :, :, ::1] v):
    """out[b, h] = p[b, h] @ v[b, h // g] (L×S times S×Ev), each output summed in double.

    Loops: double sums. Micro-kernel or BLAS, float32: products on chunks of BK keys (the plan's), the chunks added
    up in double (a long float32 sum would let one heavy weight swallow many light ones); float64: one product per
    query tile.
    """
    cdef Py_ssize_t B = p.shape[0], Hq = p.shape[1], L = p.shape[2], S = p.shape[3]
    cdef Py_ssize_t Hkv = v.shape[1], Ev = v.shape[3]
    if B * Hq * L * Ev == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Plan plan = _plan(<double>B * Hq * L * S * Ev, L, max(L, S, Ev), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ
    cdef bint chunked = tiles != TILES_LOOPS and floating is float and S > plan.BK
    cdef Py_ssize_t chunk = plan.BK if chunked else max(S, 1)
    cdef const floating* pp = &p[0, 0, 0, 0]
    cdef const floating* vp = &v[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, b, h, i0, nq, jc, j0, nk, x
    cdef const floating* prow
    cdef const floating* vh
    cdef floating* orow
    cdef floating* tile = NULL
    cdef double* acc = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        # per thread: loops, Ev doubles (row sums); chunked products, a float32 product tile and its double sum
        acc = <double*>malloc((BQ * Ev if chunked else Ev) * sizeof(double))
        tile = <floating*>malloc(BQ * Ev * sizeof(floating)) if chunked else NULL
        for w in prange(B * Hq * n_qt, schedule="dynamic"):
            if acc == NULL or (tile == NULL and chunked):
                failed_flag[0] = 1
                continue
            b = w // (Hq * n_qt)
            h = (w // n_qt) % Hq
            i0 = (w % n_qt) * BQ
            nq = min(BQ, L - i0)
            prow = pp + ((b * Hq + h) * L + i0) * S
            vh = vp + (b * Hkv + h // group) * S * Ev
            orow = op + ((b * Hq + h) * L + i0) * Ev
            if not chunked:
                _gemm_nn(nq, Ev, S, prow, S, vh, Ev, orow, Ev, acc, tiles)
                continue
            for x in range(nq * Ev):
                acc[x] = 0
            for jc in range((S + chunk - 1) // chunk):
                j0 = jc * chunk
                nk = min(chunk, S - j0)
                _gemm_nn(nq, Ev, nk, prow + j0, S, vh + j0 * Ev, Ev, tile, Ev, NULL, tiles)
                for x in range(nq * Ev):
                    acc[x] = acc[x] + tile[x]
            for x in range(nq * Ev):
                orow[x] = <floating>acc[x]
        free(acc)
        free(tile)
    if failed:
        raise MemoryError("weighted_sum: no memory for the per-thread buffers")


# ---------------------------------------------------------------------------------------------------------------
# Fused attention
# ---------------------------------------------------------------------------------------------------------------

cdef Py_ssize_t _DIAG_ROWS = 64   # on the causal diagonal, query rows go in groups of this many


cdef inline floating _fabs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline double _abs_max(const floating* x, Py_ssize_t n) noexcept nogil:
    """max |x[j]| over j < n, ignoring NaN (0 when n == 0); LANES partial results so that it vectorises."""
    cdef floating acc[LANES]
    cdef floating a
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = n - n % LANES
    for u in range(LANES):
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            a = _fabs(x[j * LANES + u])
            acc[u] = a if a > acc[u] else acc[u]
    for j in range(nfull, n):
        a = _fabs(x[j])
        acc[0] = a if a > acc[0] else acc[0]
    for u in range(1, LANES):
        acc[0] = acc[u] if acc[u] > acc[0] else acc[0]
    return acc[0]


cdef struct Tile:
    # per-thread scratch of the fused kernel, for one query tile (nq <= BQ rows); the void* hold `floating`
    void* s               # BQ×BK scores, then probabilities
    void* bt              # micro-kernel and loops: E×(BK + 32) (transposed K tile) and BK doubles
    double* acc           # BQ×Ev: the output rows, a running weighted average
    double* m             # BQ: running row max
    double* l             # BQ: running row sum
    double* keep          # BQ: factor of the old average in the new one, l_old·alpha / l_new
    double* add           # BQ: factor of this tile's P·V in it, up / l_new


cdef void _fold_pv_loops(double* acc, const floating* p, Py_ssize_t nq, Py_ssize_t nk, const floating* v,
                         Py_ssize_t Ev, const double* keep, const double* add, const double* l) noexcept nogil:
    """acc[r] = acc[r]·keep[r] + Σ_j (p[r, j]·add[r])·v[j] for the rows with l[r] != 0 (p: nq×nk, v: nk×Ev).

    The loops' P·V, folded straight into the running average: the weights p·add sum to at most 1, so nothing can
    overflow, even with huge V. Keys go in groups of 4, whose products are summed in the dtype (FMAs on whole
    vectors) and then added into double: the error stays within a few 2^-24 of Σ|p·v| however many keys.
    """
    cdef Py_ssize_t r, c, j
    cdef double kr, ar, wj
    cdef floating w0, w1, w2, w3
    cdef double* arow
    cdef const floating* prow
    cdef const floating* v0
    cdef const floating* v1
    cdef const floating* v2
    cdef const floating* v3
    for r in range(nq):
        if l[r] == 0.0:
            continue
        kr = keep[r]
        ar = add[r]
        arow = acc + r * Ev
        prow = p + r * nk
        for c in range(Ev):
            arow[c] = arow[c] * kr
        j = 0
        while j + 4 <= nk:
            w0 = <floating>(prow[j] * ar)
            w1 = <floating>(prow[j + 1] * ar)
            w2 = <floating>(prow[j + 2] * ar)
            w3 = <floating>(prow[j + 3] * ar)
            v0 = v + j * Ev
            v1 = v0 + Ev
            v2 = v1 + Ev
            v3 = v2 + Ev
            for c in range(Ev):
                arow[c] = arow[c] + <double>(w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c])
            j += 4
        while j < nk:
            wj = prow[j] * ar
            v0 = v + j * Ev
            for c in range(Ev):
                arow[c] = arow[c] + wj * v0[c]
            j += 1


cdef void _attend_block(double* acc, floating* pv, const floating* q, const floating* k, const floating* v,
                        Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t j0, Py_ssize_t nk,
                        Py_ssize_t E, Py_ssize_t Ev, floating scale, double up, const Masks* mk,
                        const Tile* t, Py_ssize_t r0, int tiles) noexcept nogil:
    """One block of the online softmax: queries i0..i0+nq-1 (rows q, acc, pv; rows r0.. of t.m, t.l, ...) against
    keys j0..j0+nk-1. pv (nq×Ev; micro-kernel and BLAS) receives the tile product P·V: the caller passes the output
    rows.

    m, l: running max and sum of each row; acc: its output so far, kept as a weighted average (already divided by
    l), so that it never grows past the largest |V|:  acc = acc·(alpha·l_old / l_new) + (P·V)·(1 / l_new),
    alpha = exp(m_old - m_new). Micro-kernel and BLAS: P·V is one float32 (or float64) product per tile, added into
    the double acc; the loops fold P·V into acc themselves (_fold_pv_loops).
    up > 1 (micro-kernel and BLAS, a tile of huge V, up = 2^k >= 2·nk): P is divided by up before the product
    (exactly: a power of two), so that its P·V, at most nk·max|V| / up, cannot overflow; the factor up / l_new puts
    it back.
    """
    cdef Py_ssize_t r, c
    cdef double m_new, m_old, tile_max, ref, alpha, l_old, l_new, kr, ar
    cdef floating down = <floating>(1.0 / up)
    cdef floating* s = <floating*>t.s
    cdef floating* srow
    cdef const floating* pvrow
    cdef double* arow
    cdef double* m = t.m + r0
    cdef double* l = t.l + r0
    cdef double* keep = t.keep + r0
    cdef double* add = t.add + r0
    # 1. scores: s[r, c] = scale·⟨q[r], k[j0 + c]⟩ + masks
    _gemm_nt(nq, nk, E, scale, q, E, k + j0 * E, E, s, nk, <floating*>t.bt, tiles)
    # 2. online softmax: s[r] becomes exp(s - ref); m, l and the two factors of step 3 follow
    for r in range(nq):
        srow = s + r * nk
        if mk.mask != NULL or mk.key_bias != NULL or (mk.causal and j0 + nk - 1 > i0 + r + mk.causal_offset):
            _mask_row(srow, nk, b, h, i0 + r, j0, mk)
        tile_max = row_max(srow, nk)
        m_old = m[r]
        m_new = tile_max if tile_max > m_old else m_old
        if m_new == -INFINITY:          # nothing visible yet: exp(s - 0) is 0 (or NaN for a NaN score)
            ref, alpha = 0.0, 1.0
        else:
            ref = m_new
            if m_old == m_new:
                alpha = 1.0             # the usual case once the max has settled: no call to exp
            elif m_old == -INFINITY:
                alpha = 0.0             # first visible key: the sum restarts
            else:
                alpha = exp(m_old - m_new)
        l_old = l[r]
        l_new = l_old * alpha + exp_shift_sum(srow, nk, ref)
        l[r] = l_new
        m[r] = m_new
        if l_new != 0.0:                # (NaN included: the row stays NaN)
            keep[r] = l_old * alpha / l_new
            add[r] = up / l_new
        if up != 1.0:                   # huge V: p / up for the gemm (rare)
            for c in range(nk):
                srow[c] = srow[c] * down
    # 3. weighted sum of this tile folded into the running average (rows with l = 0 saw no key: acc stays 0)
    if tiles == TILES_LOOPS:
        _fold_pv_loops(acc, s, nq, nk, v + j0 * Ev, Ev, keep, add, l)
        return
    _gemm_nn(nq, Ev, nk, s, nk, v + j0 * Ev, Ev, pv, Ev, NULL, tiles)
    for r in range(nq):
        if l[r] != 0.0:
            kr = keep[r]
            ar = add[r]
            arow = acc + r * Ev
            pvrow = pv + r * Ev
            for c in range(Ev):
                arow[c] = arow[c] * kr + pvrow[c] * ar


cdef void _attend_query_tile(floating* o, const floating* q, const floating* k, const floating* v,
                             Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t S,
                             Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ, Py_ssize_t BK, floating scale,
                             double v_big, double up_big, const Masks* mk, floating* fbuf, double* dbuf,
                             floating* bt, int tiles) noexcept nogil:
    """o[0:nq] = softmax(scale·q kᵀ + masks) v for queries i0..i0+nq-1 of head (b, h), key tile by key tile.

    q: nq×E rows of this head; k: S×E, v: S×Ev of its key/value head; o: nq×Ev rows of out. The output rows are
    accumulated in double (Tile.acc) and written once at the end; until then o holds each key tile's P·V
    (micro-kernel, BLAS). Per-thread scratch (see Tile): fbuf (BQ·BK floating), dbuf (BQ·Ev + 4·BQ doubles), bt
    (micro-kernel and loops: E×(BK + 32) floating and BK doubles).
    Causal: key tiles past the last visible key are skipped; a tile that crosses the diagonal is split into
    groups of _DIAG_ROWS rows, each computing only the keys its last row sees.
    Huge values (micro-kernel, BLAS): a key tile whose max |V| exceeds v_big has its P scaled down by up_big
    (see _attend_block).
    """
    cdef Py_ssize_t end = _visible_end(i0 + nq - 1, S, mk)
    cdef Py_ssize_t jt, j0, nk, r, c, g, r0, ng, nk_g
    cdef double up = 1.0
    cdef floating* orow
    cdef double* arow
    cdef Tile t
    t.s = fbuf
    t.bt = bt
    t.acc = dbuf
    t.m = dbuf + BQ * Ev
    t.l = t.m + BQ
    t.keep = t.l + BQ
    t.add = t.keep + BQ
    for r in range(nq):
        t.m[r] = -INFINITY
        t.l[r] = 0.0
    memset(t.acc, 0, nq * Ev * sizeof(double))
    for jt in range((end + BK - 1) // BK):
        j0 = jt * BK
        nk = min(BK, end - j0)
        if tiles != TILES_LOOPS:
            up = up_big if _abs_max(v + j0 * Ev, nk * Ev) > v_big else 1.0
        if not mk.causal or j0 + nk - 1 <= i0 + mk.causal_offset:     # every row sees the whole tile
            _attend_block(t.acc, o, q, k, v, b, h, i0, nq, j0, nk, E, Ev, scale, up, mk, &t, 0, tiles)
            continue
        for g in range((nq + _DIAG_ROWS - 1) // _DIAG_ROWS):
            r0 = g * _DIAG_ROWS
            ng = min(_DIAG_ROWS, nq - r0)
            nk_g = min(nk, i0 + r0 + ng + mk.causal_offset - j0)       # keys up to the group's last row
            if nk_g > 0:                 # rows that see no key of this tile see none later either
                _attend_block(t.acc + r0 * Ev, o + r0 * Ev, q + r0 * E, k, v, b, h, i0 + r0, ng, j0, nk_g,
                              E, Ev, scale, up, mk, &t, r0, tiles)
    # the averages are the outputs; a row that saw no key is still zeros, a NaN row is NaN
    for r in range(nq):
        orow = o + r * Ev
        arow = t.acc + r * Ev
        for c in range(Ev):
            orow[c] = <floating>arow[c]


def attention(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
              const floating[:, :, :, ::1] v, double scale, bint causal, Py_ssize_t causal_offset,
              const floating[:, :, :, :] mask, bint has_mask, const floating[:, :] key_bias, bint has_key_bias):
    """out = softmax(scale·QKᵀ + masks) V per head, fused: O(N) extra memory, never an L×S array."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2], Ev = v.shape[3]
    if B * Hq * L * Ev == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * (E + Ev), L, max(L, S, E, Ev), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ, BK = plan.BK
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ, n_bh = B * Hq
    # Huge values (micro-kernel, BLAS): a key tile's product P·V sums up to BK terms p·v with p <= 1; with
    # |V| <= v_big it stays below half the largest float. Above, P is divided by up_big = 2^k >= 2·BK first (see
    # _attend_block).
    # (The loops need neither: they fold P·V with weights p / l, which sum to at most 1.)
    cdef double up_big = 2.0
    while up_big < 2 * BK:
        up_big *= 2
    cdef double v_big = (FLT_MAX if floating is float else DBL_MAX) / up_big
    cdef floating alpha_scale = <floating>scale
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef const floating* vp = &v[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, bh, b, h, i0, nq
    cdef floating* fbuf = NULL
    cdef double* dbuf = NULL
    cdef floating* bt = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        # per-thread scratch, see Tile: floating s; double acc, m, l, keep, add; bt (Kᵀ tile: not with BLAS)
        fbuf = <floating*>malloc(BQ * BK * sizeof(floating) + 64)
        dbuf = <double*>malloc((BQ * Ev + 4 * BQ) * sizeof(double))
        bt = NULL
        if tiles != TILES_BLAS:
            bt = <floating*>malloc(E * (BK + 32) * sizeof(floating) + BK * sizeof(double) + 64)
        # Work items: (query tile, head). Largest query tiles first, so that under causal masking the
        # dynamic schedule ends with the cheap tiles and the threads finish together.
        for w in prange(n_bh * n_qt, schedule="dynamic"):
            if fbuf == NULL or dbuf == NULL or (bt == NULL and tiles != TILES_BLAS):
                failed_flag[0] = 1
                continue
            bh = w % n_bh
            b = bh // Hq
            h = bh % Hq
            i0 = (n_qt - 1 - w // n_bh) * BQ
            nq = min(BQ, L - i0)
            _attend_query_tile(op + (bh * L + i0) * Ev, qp + (bh * L + i0) * E,
                               kp + (b * Hkv + h // group) * S * E, vp + (b * Hkv + h // group) * S * Ev,
                               b, h, i0, nq, S, E, Ev, BQ, BK, alpha_scale, v_big, up_big, &mk,
                               fbuf, dbuf, bt, tiles)
        free(fbuf)
        free(dbuf)
        free(bt)
    if failed:
        raise MemoryError("attention: no memory for the per-thread tile buffers")

