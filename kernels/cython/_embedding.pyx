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


def gather(floating[:, ::1] out, const int64_t[::1] ids, const floating[:, ::1] table):
    """out[t] = table[ids[t]]."""
    cdef Py_ssize_t T = out.shape[0], D = out.shape[1], t, c
    if T * D == 0:
        return
    cdef floating* orow
    cdef const floating* erow
    with nogil:
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
