"""Token embedding: ``gather`` (a parallel row copy) and ``gather_add_positions`` (the copy fused with the
positional add, so X + P is written once instead of written, read back and written again).

``table[ids]`` in NumPy copies one row at a time on one core; here each thread copies its own share of rows, and
the freshly allocated ``out`` is first touched (page-faulted) by the thread that writes it.
"""

from __future__ import annotations

from numba import njit, prange

from ._config import PARALLEL


@njit(**PARALLEL)
def gather(out, ids, table):
    """out[t] = table[ids[t]].   out (T, D), ids (T,) int64 in [0, V), table (V, D)."""
    T, D = out.shape
    for t in prange(T):
        row = table[ids[t]]  # (D,) view, no copy
        for c in range(D):
            out[t, c] = row[c]


@njit(**PARALLEL)
def gather_add_positions(out, ids, table, positions, seq_len, offset):
    """out[t] = table[ids[t]] + positions[offset + t % seq_len].   out (T, D), T = B * seq_len, positions (P, D)."""
    T, D = out.shape
    for t in prange(T):
        row = table[ids[t]]  # (D,)
        pos = positions[offset + t % seq_len]  # (D,)
        for c in range(D):
            out[t, c] = row[c] + pos[c]
