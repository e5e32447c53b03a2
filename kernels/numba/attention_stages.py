"""Attention stage by stage: ``scores`` -> ``softmax`` -> ``weighted_sum``, each a parallel kernel of its own.

These build the full (B, Hq, L, S) score matrix. They exist to be read and profiled one stage at a time; the fused
kernel (``attention_fused.py``) computes the same thing without the L x S array.

GQA: query head ``h`` reads key/value head ``h // g`` with ``g = Hq // Hkv``; K and V are never expanded.
``mask`` (B, Hq, L, S) and ``key_bias`` (B, S) may be read-only broadcast views (zero strides). The wrapper hands
them over as a flat read-only view of the memory they address plus their strides in elements, so that one compiled
variant serves contiguous arrays and broadcast views alike; they are not read unless ``has_mask`` / ``has_key_bias``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._config import PARALLEL


@njit(**PARALLEL)
def scores(out, q, k, scale, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst, has_key_bias):
    """out[b, h, i, j] = scale * <q[b, h, i], k[b, h // g, j]> (+ mask) (+ key_bias); -inf where causal hides j
    (and, with ``window`` W > 0, where j <= i + causal_offset - W).

    out (B, Hq, L, S), q (B, Hq, L, E), k (B, Hkv, S, E). ``scale`` has the dtype of the arrays. ``mask`` and
    ``key_bias`` come flat with their strides in elements (zero on a broadcast axis):
    mask[b, h, i, j] = ``mask[b*mst[0] + h*mst[1] + i*mst[2] + j*mst[3]]``,
    key_bias[b, j] = ``key_bias[b*kst[0] + j*kst[1]]``.
    """
    B, Hq, L, E = q.shape
    Hkv = k.shape[1]
    S = k.shape[2]
    g = Hq // Hkv
    zero = out.dtype.type(0.0)
    neg_inf = out.dtype.type(-np.inf)
    for r in prange(B * Hq * L):  # one query row per iteration
        b = r // (Hq * L)
        h = (r // L) % Hq
        i = r % L
        qi = q[b, h, i]  # (E,)
        kh = k[b, h // g]  # (S, E)
        row = out[b, h, i]  # (S,)
        # causal: keys j <= i + causal_offset are visible, the rest are -inf
        n_visible = S
        first = 0
        if causal:
            n_visible = min(max(i + causal_offset + 1, 0), S)
            if window > 0:
                first = min(max(i + causal_offset - window + 1, 0), n_visible)
        for j in range(n_visible):  # from 0, not from ``first``: a loop of fixed start vectorises (2.5x at N=256)
            acc = zero
            for e in range(E):  # scores: <q_i, k_j>
                acc += qi[e] * kh[j, e]
            row[j] = acc * scale
        for j in range(first):  # the window hides the keys before it
            row[j] = neg_inf
        for j in range(n_visible, S):
            row[j] = neg_inf
        if has_mask:
            base = b * mst[0] + h * mst[1] + i * mst[2]
            for j in range(S):
                row[j] += mask[base + j * mst[3]]
        if has_key_bias:
            base = b * kst[0]
            for j in range(S):
                row[j] += key_bias[base + j * kst[1]]


@njit(**PARALLEL)
def softmax(out, s):
    """Row softmax of s (R, S) into out (R, S); ``out`` may be ``s`` itself (in place).

    The row max is subtracted before exp; the sum is accumulated in float64. A row that is all ``-inf`` (nothing
    to attend to) gives zeros; a row holding NaN gives NaN.
    """
    R, S = s.shape
    zero = out.dtype.type(0.0)
    for r in prange(R):
        x = s[r]  # (S,)
        y = out[r]  # (S,) may alias x: each element is read before it is written
        m = -np.inf
        has_nan = False
        for j in range(S):  # row max
            if x[j] > m:
                m = x[j]
            if x[j] != x[j]:
                has_nan = True
        if m == -np.inf and not has_nan:  # fully masked row: zeros, not 0/0
            for j in range(S):
                y[j] = zero
            continue
        mx = out.dtype.type(m)
        for j in range(S):  # exp
            y[j] = np.exp(x[j] - mx)
        total = 0.0  # float64 sum, in a pass of its own: a loop that also stores may be compiled differently
        for j in range(S):  # when out is s (LLVM versions it on aliasing), and in-place must equal out-of-place
            total += y[j]
        inv = out.dtype.type(1.0 / total)
        for j in range(S):  # normalise
            y[j] *= inv


@njit(**PARALLEL)
def weighted_sum(out, p, v, n_threads):
    """out[b, h, i] = sum_j p[b, h, i, j] * v[b, h // g, j].

    out (B, Hq, L, Ev), p (B, Hq, L, S), v (B, Hkv, S, Ev). Each row is summed in float64 (one buffer per thread,
    ``n_threads = numba.get_num_threads()`` of the caller): one heavy weight must not swallow many light ones.
    """
    B, Hq, L, S = p.shape
    Hkv = v.shape[1]
    Ev = v.shape[3]
    g = Hq // Hkv
    acc_buf = np.empty((n_threads, Ev), np.float64)
    for r in prange(B * Hq * L):  # one query row per iteration
        acc = acc_buf[numba.get_thread_id()]  # (Ev,)
        b = r // (Hq * L)
        h = (r // L) % Hq
        i = r % L
        pi = p[b, h, i]  # (S,)
        vh = v[b, h // g]  # (S, Ev)
        for c in range(Ev):
            acc[c] = 0.0
        for j in range(S):  # acc += p_ij * v_j, vectorised over the Ev features
            pij = np.float64(pi[j])
            for c in range(Ev):
                acc[c] += pij * vh[j, c]
        o = out[b, h, i]  # (Ev,)
        for c in range(Ev):
            o[c] = acc[c]


# ----------------------------------------------------------------------------------------------------------------
# Backward, stage by stage (the gradients of each stage above; same GQA mapping, K/V never expanded)
# ----------------------------------------------------------------------------------------------------------------
@njit(**PARALLEL)
def softmax_backward(grad_s, grad_p, p):
    """grad_s = p * (grad_p - rowsum(grad_p * p)), row by row; (R, S) each. The row sum is float64."""
    R, S = p.shape
    for r in prange(R):
        total = 0.0
        for j in range(S):
            total += np.float64(grad_p[r, j]) * np.float64(p[r, j])
        d = p.dtype.type(total)
        for j in range(S):
            grad_s[r, j] = p[r, j] * (grad_p[r, j] - d)


@njit(**PARALLEL)
def scores_backward(grad_q, grad_k, grad_s, q, k, scale, n_threads):
    """grad_q = scale · grad_s @ k; grad_k = scale · (sum over the group's query heads of grad_sᵀ @ q).

    grad_q, q (B, Hq, L, E), grad_k, k (B, Hkv, S, E), grad_s (B, Hq, L, S). Sums in float64 (one row buffer per
    thread); a key's gradient sums its query heads, then their rows, in increasing order.
    """
    B, Hq, L, E = q.shape
    Hkv = k.shape[1]
    S = k.shape[2]
    g = Hq // Hkv
    acc_buf = np.empty((n_threads, E), np.float64)
    for r in prange(B * Hq * L):  # grad_q: one query row per iteration
        acc = acc_buf[numba.get_thread_id()]
        b = r // (Hq * L)
        h = (r // L) % Hq
        i = r % L
        for e in range(E):
            acc[e] = 0.0
        for j in range(S):
            gs = np.float64(grad_s[b, h, i, j])
            for e in range(E):
                acc[e] += gs * k[b, h // g, j, e]
        for e in range(E):
            grad_q[b, h, i, e] = acc[e] * scale
    for r in prange(B * Hkv * S):  # grad_k: one key row per iteration
        acc = acc_buf[numba.get_thread_id()]
        b = r // (Hkv * S)
        hk = (r // S) % Hkv
        j = r % S
        for e in range(E):
            acc[e] = 0.0
        for h in range(hk * g, hk * g + g):
            for i in range(L):
                gs = np.float64(grad_s[b, h, i, j])
                for e in range(E):
                    acc[e] += gs * q[b, h, i, e]
        for e in range(E):
            grad_k[b, hk, j, e] = acc[e] * scale


@njit(**PARALLEL)
def weighted_sum_backward(grad_p, grad_v, grad_out, p, v, n_threads):
    """grad_p = grad_out @ vᵀ (B, Hq, L, S); grad_v = sum over the group's query heads of pᵀ @ grad_out.

    grad_out (B, Hq, L, Ev), p (B, Hq, L, S), v, grad_v (B, Hkv, S, Ev). Sums in float64.
    """
    B, Hq, L, S = p.shape
    Hkv = v.shape[1]
    Ev = v.shape[3]
    g = Hq // Hkv
    acc_buf = np.empty((n_threads, Ev), np.float64)
    for r in prange(B * Hq * L):  # grad_p: one query row per iteration
        b = r // (Hq * L)
        h = (r // L) % Hq
        i = r % L
        go = grad_out[b, h, i]  # (Ev,)
        vh = v[b, h // g]  # (S, Ev)
        for j in range(S):
            total = 0.0
            for c in range(Ev):
                total += np.float64(go[c]) * vh[j, c]
            grad_p[b, h, i, j] = total
    for r in prange(B * Hkv * S):  # grad_v: one key row per iteration
        acc = acc_buf[numba.get_thread_id()]
        b = r // (Hkv * S)
        hk = (r // S) % Hkv
        j = r % S
        for c in range(Ev):
            acc[c] = 0.0
        for h in range(hk * g, hk * g + g):
            for i in range(L):
                pij = np.float64(p[b, h, i, j])
                for c in range(Ev):
                    acc[c] += pij * grad_out[b, h, i, c]
        for c in range(Ev):
            grad_v[b, hk, j, c] = acc[c]
