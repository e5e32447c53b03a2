"""Token embedding: ``gather`` (a parallel row copy) and ``gather_add_positions`` (the copy fused with the
positional add, so X + P is written once instead of written, read back and written again).

``table[ids]`` in NumPy copies one row at a time on one core; here each thread copies its own share of rows, and
the freshly allocated ``out`` is first touched (page-faulted) by the thread that writes it.
"""

from __future__ import annotations

import numpy as np
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


@njit(**PARALLEL)
def gather_backward(grad_table, grad_out, ids):
    """grad_table[v] = sum of grad_out[t] over the t with ids[t] == v, in increasing t; other rows 0.

    grad_table (V, D), grad_out (T, D), ids (T,) int64 in [0, V). A counting sort of the ids (serial, O(T + V))
    lists each id's positions in increasing order; then each thread sums whole rows of the table, so every row has
    one writer and one order of summation: bitwise the same for any thread count.
    """
    V, D = grad_table.shape
    T = ids.shape[0]
    start = np.zeros(V + 1, np.int64)  # start[v] .. start[v + 1]: the positions of id v in ``order``
    for t in range(T):
        start[ids[t] + 1] += 1
    for v in range(V):
        start[v + 1] += start[v]
    fill = start[:V].copy()
    order = np.empty(T, np.int64)
    for t in range(T):  # stable: positions of each id in increasing t
        order[fill[ids[t]]] = t
        fill[ids[t]] += 1
    for v in prange(V):
        row = grad_table[v]  # (D,)
        for c in range(D):
            row[c] = 0.0
        for u in range(start[v], start[v + 1]):
            src = grad_out[order[u]]  # (D,)
            for c in range(D):
                row[c] += src[c]
