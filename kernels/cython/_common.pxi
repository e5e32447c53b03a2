# Helpers shared by the Cython kernels (textually included by each .pyx: `include "_common.pxi"`):
# the OpenMP shim, the fused floating type, a vectorisable exp, and row reductions.
#
# Everything here is inline, so each extension carries its own copy and none imports another at run time.
# The loops are written so that gcc vectorises them without -ffast-math: no float reduction runs in one
# accumulator (they use LANES partial results), and branches are plain selects.

from libc.math cimport INFINITY
from libc.stdint cimport int32_t

# OpenMP, probed at build time: setup.py compiles with -fopenmp when a test program builds, else without.
# Cython's prange hides its pragmas behind `#ifdef _OPENMP`, so the same code builds serial kernels.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FA_OPENMP_ENABLED 1
    static int fa_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FA_OPENMP_ENABLED 0
    static int fa_omp_max_threads(void) { return 1; }
    #endif
    """
    const int FA_OPENMP_ENABLED
    int fa_omp_max_threads() noexcept nogil


# Which instruction sets the CPU (and the OS) supports, for choosing among the ISA builds (see setup.py).
cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    static inline int fa_cpu_supports(int isa) {
        __builtin_cpu_init();
        if (isa == 1)
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        if (isa == 2)
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
                && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        return 0;
    }
    #else
    static inline int fa_cpu_supports(int isa) { (void)isa; return 0; }
    #endif
    """
    int fa_cpu_supports(int isa) noexcept nogil


# What every extension exports about itself: its thread count, whether it was built with OpenMP, and whether this
# CPU runs an ISA build. The count lives in C: one process-wide value (fastattn._threads, the one owner, sets it in
# every loaded extension through _set_num_threads) and a per-OS-thread override (_set_local_threads: fastattn.models
# runs a small decode step on one thread in the calling Python thread only, without touching other threads' calls).
# Every prange reads `_n_threads`, which is that C expression.
cdef extern from *:
    """
    #if defined(_MSC_VER)
    #define FA_THREAD_LOCAL __declspec(thread)
    #else
    #define FA_THREAD_LOCAL __thread
    #endif
    static int fa_threads_global = 0;              /* 0 until set: OpenMP's default */
    static FA_THREAD_LOCAL int fa_threads_local = 0; /* 0: no override in this thread */
    static int fa_threads_now(void) {
        if (fa_threads_local > 0) return fa_threads_local;
        return fa_threads_global > 0 ? fa_threads_global : fa_omp_max_threads();
    }
    """
    int fa_threads_global
    int fa_threads_local
    int _n_threads "fa_threads_now()"


def _set_num_threads(int n):
    """The process-wide count of this extension's parallel loops (fastattn._threads calls it)."""
    global fa_threads_global
    fa_threads_global = n


def _set_local_threads(int n):
    """A count for loops launched from the calling thread only; 0 clears it. Returns the previous override."""
    global fa_threads_local
    previous = fa_threads_local
    fa_threads_local = n
    return previous


def get_num_threads():
    """Threads of this extension's parallel loops in the calling thread (1 when built without OpenMP)."""
    return _n_threads if FA_OPENMP_ENABLED else 1


def openmp_enabled():
    """True when this extension was compiled with OpenMP (else its kernels run on one thread)."""
    return bool(FA_OPENMP_ENABLED)


def cpu_supports(str isa):
    """Whether this CPU runs the `isa` build ("avx2": AVX2+FMA, "avx512": AVX-512 F/DQ/BW/VL)."""
    return bool(fa_cpu_supports({"avx2": 1, "avx512": 2}.get(isa, 0)))


ctypedef fused floating:
    float
    double

# Partial results per reduction: 16 floats are one AVX-512 register, four SSE2 registers.
# The row maximum uses MAX_LANES: gcc unrolls a 16-wide max block completely and then keeps it scalar.
cdef enum:
    LANES = 16
    MAX_LANES = 64

cdef union _f32bits:
    float f
    int32_t i


cdef inline float _fexpf_core(float x) noexcept nogil:
    """e^x for x in [-87, 88] (NaN in, NaN out): Cephes' expf without its branches.

    Range reduction x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two so that r is exact), e^r by a degree-7
    polynomial (relative error about 1e-7), and 2^n built in the exponent bits of a float.
    """
    cdef float t, n, r, p
    cdef _f32bits two_n
    cdef float log2e = 1.44269504088896341, shifter = 12582912.0   # 1.5·2^23
    cdef float ln2_hi = 0.693359375, ln2_lo = -2.12194440e-4, one = 1.0
    t = x * log2e + shifter                  # rounds x·log2(e) to the nearest integer n, kept in t's low bits
    n = t - shifter
    r = x - n * ln2_hi
    r = r - n * ln2_lo
    p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * r * r + r + one
    two_n.f = t
    two_n.i = (two_n.i - 0x4B400000 + 127) << 23   # 2^n in the exponent bits
    return p * two_n.f


cdef inline float fexpf(float x) noexcept nogil:
    """exp(x) in float32 for any x, branch-free so that a loop over it vectorises (relative error ~1e-7).

    x < -87.3 (including -inf) gives 0, x > 88.7 gives inf, NaN stays NaN.
    """
    cdef float lo = -87.0, hi = 88.0, zero = 0.0
    cdef float xc = lo if x < lo else x      # NaN passes the clamps (comparisons with NaN are false)
    xc = hi if xc > hi else xc
    cdef float p = _fexpf_core(xc)
    p = zero if x < <float>-87.33654 else p
    return <float>INFINITY if x > <float>88.72283 else p


cdef inline float fexpf_neg(float x) noexcept nogil:
    """exp(x) in float32 for x <= 0, -inf or NaN (what a softmax feeds it): fexpf without the overflow side.

    x < -87.3 (including -inf) gives 0, NaN stays NaN. About 20% cheaper than fexpf.
    """
    cdef float lo = -87.0, zero = 0.0
    cdef float p = _fexpf_core(lo if x < lo else x)
    return zero if x < <float>-87.33654 else p


cdef inline double row_max(const floating* row, Py_ssize_t n) noexcept nogil:
    """Largest entry of row[0:n] ignoring NaN; -inf when n == 0 or all are -inf/NaN.

    MAX_LANES partial maxima, then blocks of LANES, then a scalar tail; the lanes are folded in halves (a few
    vector steps, not a chain of MAX_LANES scalar ones: that chain cost ~5% of the fused kernel).
    """
    cdef floating acc[MAX_LANES]
    cdef floating x
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = n - n % MAX_LANES
    for u in range(MAX_LANES):
        acc[u] = -INFINITY
    for j in range(0, nfull // MAX_LANES):
        for u in range(MAX_LANES):
            x = row[j * MAX_LANES + u]
            acc[u] = x if x > acc[u] else acc[u]
    j = nfull
    while j + LANES <= n:
        for u in range(LANES):
            x = row[j + u]
            acc[u] = x if x > acc[u] else acc[u]
        j += LANES
    while j < n:
        x = row[j]
        acc[0] = x if x > acc[0] else acc[0]
        j += 1
    for u in range(32):       # fold 64 -> 1 (MAX_LANES = 64)
        acc[u] = acc[u + 32] if acc[u + 32] > acc[u] else acc[u]
    for u in range(16):
        acc[u] = acc[u + 16] if acc[u + 16] > acc[u] else acc[u]
    for u in range(8):
        acc[u] = acc[u + 8] if acc[u + 8] > acc[u] else acc[u]
    for u in range(4):
        acc[u] = acc[u + 4] if acc[u + 4] > acc[u] else acc[u]
    for u in range(2):
        acc[u] = acc[u + 2] if acc[u + 2] > acc[u] else acc[u]
    return acc[1] if acc[1] > acc[0] else acc[0]


cdef inline double _sum_lanes(double* acc) noexcept nogil:
    """acc[0] + ... + acc[LANES-1] (LANES = 16), folded in halves (pairwise: a few vector adds)."""
    cdef Py_ssize_t u
    for u in range(8):
        acc[u] = acc[u] + acc[u + 8]
    for u in range(4):
        acc[u] = acc[u] + acc[u + 4]
    for u in range(2):
        acc[u] = acc[u] + acc[u + 2]
    return acc[0] + acc[1]


cdef inline floating _exp_neg(floating x) noexcept nogil:
    """exp(x) for x <= 0 (or -inf, NaN): fexpf_neg in float32, libm's exp in double."""
    if floating is float:
        return fexpf_neg(x)
    else:
        return _exp(x)


cdef inline double exp_shift_sum(floating* row, Py_ssize_t n, double ref) noexcept nogil:
    """row[j] = exp(row[j] - ref) in place; returns the sum, accumulated in double.

    ref must be >= every entry (a softmax passes the row maximum, or 0 for a row of -inf): float32 then uses
    fexpf_neg. -inf entries give 0, NaN entries NaN.
    Wide sum: the exps stay float32, but the LANES partial sums are double, so that one dominant entry (p = 1)
    does not swallow many tiny ones (p < 2^-24 vanishes beside 1 in float32). To keep the conversions cheap, four
    entries are added in float32 first, pairwise: each group of four is rounded twice (relative error <= 2^-23 of
    the group), so the sum's error stays below 2^-23 of the total, however long the row. float64 rows are summed
    one entry at a time (grouping only slows the calls to libm's exp there).
    """
    cdef double acc[LANES]
    cdef floating p, p1, p2, p3
    cdef floating m = <floating>ref
    cdef Py_ssize_t j, u
    cdef Py_ssize_t step = 4 * LANES
    cdef Py_ssize_t ngroup = n - n % step if floating is float else 0
    for u in range(LANES):
        acc[u] = 0
    for j in range(0, ngroup // step):      # float32: groups of four (see above)
        for u in range(LANES):
            p = _exp_neg(row[j * step + u] - m)
            p1 = _exp_neg(row[j * step + LANES + u] - m)
            p2 = _exp_neg(row[j * step + 2 * LANES + u] - m)
            p3 = _exp_neg(row[j * step + 3 * LANES + u] - m)
            row[j * step + u] = p
            row[j * step + LANES + u] = p1
            row[j * step + 2 * LANES + u] = p2
            row[j * step + 3 * LANES + u] = p3
            acc[u] = acc[u] + <double>((p + p1) + (p2 + p3))
    # The rest: float32, one last group of four whose entries past n count as 0; float64, entry j into lane
    # j % LANES. Either way entry j lands in the same partial sum, in the same order, whatever n is: a row's sum
    # (and so a padded sequence's attention) does not change when -inf entries (exact zeros) follow its last one.
    cdef float last[4 * LANES]
    j = ngroup
    if floating is float:
        if j < n:                            # the exps of the last group go through a zeroed buffer of 4·LANES
            for u in range(4 * LANES):
                last[u] = 0
            for u in range(n - j):
                p = _exp_neg(row[j + u] - m)
                row[j + u] = p
                last[u] = p
            for u in range(LANES):
                acc[u] = acc[u] + <double>((last[u] + last[LANES + u]) + (last[2 * LANES + u] + last[3 * LANES + u]))
    else:
        while j + LANES <= n:
            for u in range(LANES):
                p = _exp_neg(row[j + u] - m)
                row[j + u] = p
                acc[u] = acc[u] + <double>p
            j += LANES
        for u in range(n - j):
            p = _exp_neg(row[j + u] - m)
            row[j + u] = p
            acc[u] = acc[u] + <double>p
    return _sum_lanes(acc)


cdef extern from "<math.h>" nogil:
    double _exp "exp"(double x)
