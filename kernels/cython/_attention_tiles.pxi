# The tile products of the attention kernels (textually included by _attention.pyx): the register-blocked
# micro-kernel of _tile_gemm.h, SciPy's BLAS loaded at run time, and the plain loops; which of them a call uses and
# with what tile shape (Plan). Every kernel of _attention.pyx multiplies its tiles through _gemm_nt / _gemm_nn here.

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
# Tile products with a strided left operand (the backward kernels: Pᵀ·dO, dSᵀ·Q, dS·K) and the packing of Bᵀ
# ---------------------------------------------------------------------------------------------------------------

cdef Py_ssize_t _pack_t(floating* bt, const floating* b, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ldb) noexcept nogil:
    """bt = Bᵀ (k×n) of b (n×k, rows ldb apart), with rows ldt apart, ldt an odd number of cache lines (see _gemm_nt:
    rows a power of two of bytes apart would share a few L1 sets); returns ldt. bt: room for k·(n + 32) entries."""
    cdef Py_ssize_t line = 64 // sizeof(floating)
    cdef Py_ssize_t ldt = (n + line - 1) // line
    cdef Py_ssize_t j, e
    ldt = (ldt + 1 - ldt % 2) * line
    for j in range(n):
        for e in range(k):
            bt[e * ldt + j] = b[j * ldb + e]
    return ldt


cdef void _gemm_ab(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha, const floating* a, Py_ssize_t a_rs,
                   Py_ssize_t a_cs, const floating* b, Py_ssize_t ldb, floating* c, Py_ssize_t ldc, double* acc,
                   int tiles) noexcept nogil:
    """c[i, j] = alpha · Σ_e a[i·a_rs + e·a_cs]·b[e, j] for i < m, j < n: C = alpha·A·B with A read through its
    strides (a_cs == 1: A row-major; a_rs == 1: A stored transposed, as Pᵀ or dSᵀ of a row-major tile), B row-major.

    acc: scratch for n doubles (loops: each entry summed in double, then scaled).
    """
    cdef char trans = b'T', notrans = b'N'
    cdef char* ta = &notrans if a_cs == 1 else &trans
    cdef int im = <int>m, jn = <int>n, ek = <int>k, ildb = _i(ldb), ildc = _i(ldc)
    cdef int ilda = _i(a_rs if a_cs == 1 else a_cs)
    cdef floating zero = 0
    cdef Py_ssize_t i, j, e
    cdef double ae
    cdef floating* crow
    cdef const floating* brow
    if tiles == TILES_MICRO:
        _micro_gemm(m, n, k, alpha, a, a_rs, a_cs, b, ldb, c, ldc)
        return
    if tiles == TILES_BLAS and (a_cs == 1 or a_rs == 1):
        # row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ; A row-major is Aᵀ column-major ('N'), A transposed is A ('T')
        if floating is float:
            _sgemm(&notrans, ta, &jn, &im, &ek, &alpha, <float*>b, &ildb, <float*>a, &ilda, &zero, c, &ildc)
        else:
            _dgemm(&notrans, ta, &jn, &im, &ek, &alpha, <double*>b, &ildb, <double*>a, &ilda, &zero, c, &ildc)
        return
    for i in range(m):
        crow = c + i * ldc
        for j in range(n):
            acc[j] = 0
        for e in range(k):
            ae = a[i * a_rs + e * a_cs]
            brow = b + e * ldb
            for j in range(n):
                acc[j] = acc[j] + ae * brow[j]
        for j in range(n):
            crow[j] = <floating>(alpha * acc[j])
