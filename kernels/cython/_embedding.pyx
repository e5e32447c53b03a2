# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# fastattn: isa-variants
"""Embedding kernels: gather (row copy), gather_add_positions (fused), add_positions, rope.

Contract: kernels/README.md. All arrays are C-contiguous; ids are int64 already checked to lie in [0, V).
Each kernel is one parallel loop over rows; the loop over a row is contiguous and vectorises (also built as
_embedding_avx2 / _embedding_avx512, see setup.py: a row copy in 64-byte vectors beat glibc's memcpy of each
3 KiB row by ~10% at 4096 ids of a GPT-2 table).
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

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

