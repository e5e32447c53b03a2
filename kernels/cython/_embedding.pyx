# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# fastattn: isa-variants
"""Embedding kernels: gather (row copy), gather_add_positions (fused), add_positions, rope; and the backward
kernels gather_backward (a scatter-add made deterministic) and add_positions_backward.

Contract: kernels/README.md. All arrays are C-contiguous; ids are int64 already checked to lie in [0, V).
Each kernel is one parallel loop over rows; the loop over a row is contiguous and vectorises (also built as
_embedding_avx2 / _embedding_avx512, see setup.py: a row copy in 64-byte vectors beat glibc's memcpy of each
3 KiB row by ~10% at 4096 ids of a GPT-2 table).
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

include "_common.pxi"


# A large gather writes its output with non-temporal (streaming) stores: an output far larger than the caches is
# not read back from them, and ordinary stores first read every output line into the cache (read-for-ownership)
# and later write it back, a third more memory traffic than the copy itself (glibc's memcpy streams from about the
# size of the last-level cache on, which is why a plain copy of the same bytes beat the gather). Each thread
# also prefetches the rows a few tokens ahead: the ids are random, the hardware prefetcher cannot guess the next
# row. Below _STREAM_BYTES the output stays in cache for the kernel that reads it next (a LayerNorm).
cdef extern from *:
    """
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    /* n bytes from src to dst (no overlap) with 16-byte streaming stores where dst is aligned; the ends by memcpy. */
    static inline void fa_stream_copy(void *dst, const void *src, size_t n) {
        char *d = (char *)dst;
        const char *s = (const char *)src;
        size_t head = (16 - ((size_t)d & 15)) & 15;
        if (head > n) head = n;
        memcpy(d, s, head);
        d += head; s += head; n -= head;
        for (; n >= 64; n -= 64, d += 64, s += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
            _mm_stream_si128((__m128i *)d, a);
            _mm_stream_si128((__m128i *)(d + 16), b);
            _mm_stream_si128((__m128i *)(d + 32), c);
            _mm_stream_si128((__m128i *)(d + 48), e);
        }
        memcpy(d, s, n);
    }
    static inline void fa_stream_fence(void) { _mm_sfence(); }
    #define FA_CAN_STREAM 1
    #else
    static inline void fa_stream_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
    static inline void fa_stream_fence(void) {}
    #define FA_CAN_STREAM 0
    #endif
    static inline void fa_prefetch(const void *p) { __builtin_prefetch(p, 0, 0); }
    """
    void fa_stream_copy(void* dst, const void* src, size_t n) noexcept nogil
    void fa_stream_fence() noexcept nogil
    void fa_prefetch(const void* p) noexcept nogil
    const int FA_CAN_STREAM

cdef Py_ssize_t _STREAM_BYTES = 16 << 20   # outputs from 16 MiB on are streamed (half this machine's 32 MiB L3)
cdef Py_ssize_t _PREFETCH_AHEAD = 4        # tokens ahead
cdef Py_ssize_t _PREFETCH_LINES = 8        # cache lines of each row ahead (the hardware prefetcher takes the rest)


def gather(floating[:, ::1] out, const int64_t[::1] ids, const floating[:, ::1] table):
    """out[t] = table[ids[t]]."""
    cdef Py_ssize_t T = out.shape[0], D = out.shape[1], t, c, a, lines
    if T * D == 0:
        return
    cdef floating* orow
    cdef const floating* erow
    cdef const char* ahead
    cdef bint stream = FA_CAN_STREAM and T * D * <Py_ssize_t>sizeof(floating) >= _STREAM_BYTES
    lines = min(_PREFETCH_LINES, (D * <Py_ssize_t>sizeof(floating) + 63) // 64)
    with nogil:
        if stream:
            with parallel(num_threads=_n_threads):
                for t in prange(T, schedule="static"):
                    if t + _PREFETCH_AHEAD < T:
                        ahead = <const char*>&table[ids[t + _PREFETCH_AHEAD], 0]
                        for a in range(lines):
                            fa_prefetch(ahead + 64 * a)
                    fa_stream_copy(&out[t, 0], &table[ids[t], 0], D * sizeof(floating))
                fa_stream_fence()   # each thread's streaming stores are visible before the loop ends
        else:
            for t in prange(T, schedule="static", num_threads=_n_threads):
                orow = &out[t, 0]
                erow = &table[ids[t], 0]
                for c in range(D):
                    orow[c] = erow[c]


def gather_backward(floating[:, ::1] grad_table, const floating[:, ::1] grad_out, const int64_t[::1] ids):
    """grad_table (V, D) = 0, then grad_table[ids[t]] += grad_out[t]: each id's rows summed in increasing t, in
    double, rounded once.

    Deterministic without atomics: the ids are counting-sorted (stable, so each id's tokens stay in increasing t),
    then each vocabulary row is zeroed and summed by one thread: bitwise the same for any thread count.
    """
    cdef Py_ssize_t V = grad_table.shape[0], D = grad_table.shape[1], T = ids.shape[0], t, r, c, x, first
    if V * D == 0:
        return
    cdef Py_ssize_t* start = <Py_ssize_t*>malloc((V + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t* order = <Py_ssize_t*>malloc((T + 1) * sizeof(Py_ssize_t))
    if start == NULL or order == NULL:
        free(start)
        free(order)
        raise MemoryError("gather_backward: no memory for the sorted ids")
    cdef floating* grow
    cdef const floating* orow
    cdef double* acc = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil:
        memset(start, 0, (V + 1) * sizeof(Py_ssize_t))
        for t in range(T):                       # counting sort: start[v + 1] = number of tokens of id v ...
            start[ids[t] + 1] += 1
        for r in range(V):                       # ... then start[v] = first slot of id v in `order`
            start[r + 1] += start[r]
        for t in range(T):
            order[start[ids[t]]] = t
            start[ids[t]] += 1                   # now start[v] = end of id v's slots (= first slot of v + 1)
        with parallel(num_threads=_n_threads):
            acc = <double*>malloc((D + 1) * sizeof(double))
            for r in prange(V, schedule="static"):
                grow = &grad_table[r, 0]
                first = start[r - 1] if r > 0 else 0
                if first == start[r]:            # an id that does not occur (the most of a large vocabulary)
                    memset(grow, 0, D * sizeof(floating))
                    continue
                if acc == NULL:
                    failed_flag[0] = 1
                    continue
                for c in range(D):
                    acc[c] = 0
                for x in range(first, start[r]):
                    orow = &grad_out[order[x], 0]
                    for c in range(D):
                        acc[c] = acc[c] + orow[c]
                for c in range(D):
                    grow[c] = <floating>acc[c]
            free(acc)
    free(start)
    free(order)
    if failed:
        raise MemoryError("gather_backward: no memory for the per-thread sums")


def gather_add_positions(floating[:, ::1] out, const int64_t[::1] ids, const floating[:, ::1] table,
                         const floating[:, ::1] positions, Py_ssize_t seq_len, Py_ssize_t offset):
    """out[t] = table[ids[t]] + positions[offset + t % seq_len] (T = B·seq_len tokens)."""
    cdef Py_ssize_t T = out.shape[0], D = out.shape[1], t, c
    if T * D == 0:
        return
    cdef floating* orow
    cdef const floating* erow
    cdef const floating* prow
    with nogil:
        for t in prange(T, schedule="static", num_threads=_n_threads):
            orow = &out[t, 0]
            erow = &table[ids[t], 0]
            prow = &positions[offset + t % seq_len, 0]
            for c in range(D):
                orow[c] = erow[c] + prow[c]


def add_positions(floating[:, :, ::1] out, const floating[:, :, ::1] x, const floating[:, ::1] positions,
                  Py_ssize_t offset):
    """out[b, n] = x[b, n] + positions[offset + n]."""
    cdef Py_ssize_t B = x.shape[0], N = x.shape[1], D = x.shape[2], row, c
    if B * N * D == 0:
        return
    cdef floating* orow
    cdef const floating* xrow
    cdef const floating* prow
    with nogil:
        for row in prange(B * N, schedule="static", num_threads=_n_threads):
            orow = &out[row // N, row % N, 0]
            xrow = &x[row // N, row % N, 0]
            prow = &positions[offset + row % N, 0]
            for c in range(D):
                orow[c] = xrow[c] + prow[c]


def rope(floating[:, :, ::1] out, const floating[:, :, ::1] x, const floating[:, ::1] cos,
         const floating[:, ::1] sin, bint interleaved):
    """Rotary embedding of each row x[b, n] (d entries) by the angles of position n (cos/sin: N × d//2).

    interleaved=False (NeoX/Llama-HF): pairs (i, i + d//2); interleaved=True (GPT-J): pairs (2i, 2i + 1).
    An odd last entry (d odd) is copied unrotated.
    """
    cdef Py_ssize_t B = x.shape[0], N = x.shape[1], d = x.shape[2], half = d // 2, row, i
    if B * N * d == 0:
        return
    cdef floating* orow
    cdef const floating* xrow
    cdef const floating* crow
    cdef const floating* srow
    with nogil:
        for row in prange(B * N, schedule="static", num_threads=_n_threads):
            orow = &out[row // N, row % N, 0]
            xrow = &x[row // N, row % N, 0]
            crow = &cos[row % N, 0]
            srow = &sin[row % N, 0]
            if interleaved:
                for i in range(half):
                    orow[2 * i] = xrow[2 * i] * crow[i] - xrow[2 * i + 1] * srow[i]
                    orow[2 * i + 1] = xrow[2 * i + 1] * crow[i] + xrow[2 * i] * srow[i]
            else:
                for i in range(half):
                    orow[i] = xrow[i] * crow[i] - xrow[i + half] * srow[i]
                    orow[i + half] = xrow[i + half] * crow[i] + xrow[i] * srow[i]
            if d % 2:
                orow[d - 1] = xrow[d - 1]



def add_positions_backward(floating[:, ::1] grad_positions, const floating[:, :, ::1] grad_out, Py_ssize_t offset):
    """grad_positions (P, D): rows offset..offset+N-1 = Σ_b grad_out[b, n] (in increasing b), every other row 0."""
    cdef Py_ssize_t P = grad_positions.shape[0], D = grad_positions.shape[1]
    cdef Py_ssize_t B = grad_out.shape[0], N = grad_out.shape[1], n, b, c
    if P * D == 0:
        return
    memset(&grad_positions[0, 0], 0, P * D * sizeof(floating))
    if B * N == 0:
        return
    cdef floating* prow
    cdef const floating* grow
    with nogil:
        for n in prange(N, schedule="static", num_threads=_n_threads):
            prow = &grad_positions[offset + n, 0]
            for b in range(B):
                grow = &grad_out[b, n, 0]
                for c in range(D):
                    prow[c] = prow[c] + grow[c]
