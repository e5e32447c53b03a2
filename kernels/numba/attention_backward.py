"""Fused attention backward, flash style: the gradients of sum(grad_out * attention(q, k, v)) without an L x S array.

The forward saved ``out`` and ``lse`` (the log-sum-exp of each row's scaled, masked scores). Here each tile of
probabilities is recomputed from them, P = exp(scale · Q Kᵀ + masks − lse), and the gradients are accumulated tile
by tile (D = rowsum(grad_out ∘ out), one number per query row):

    for each key tile (tk keys of one key/value head):                 (dK, dV of the tile: float64 accumulators)
        for each query head h of its group, for each query tile that sees any of its keys:
            P  = exp(scale · Q_t K_tᵀ + masks − lse)                   scores, recomputed     (tq, tk)
            dV += Pᵀ dO_t                                              weighted-sum backward  (tk, Ev)
            dP = dO_t V_tᵀ                                                                    (tq, tk)
            dS = P ∘ (dP − D) · scale                                  softmax backward       (tq, tk)
            dK += dSᵀ Q_t                                              scores backward        (tk, E)
            dQ_t += dS K_t,  K̄_t += P K_t,  rowsum(P), rowsum(dS)     (float64 rows of the head)
    (causal: query tiles wholly above the diagonal are skipped; a window skips those wholly past its band)
    finally, per query row: dQ -= (rowsum(dS) / rowsum(P)) · K̄

dQ's residual. In exact arithmetic each row of dS sums to 0 (D is the P-weighted mean of dP), so dQ = dS K does
not depend on where K sits, only on how the keys differ. In float32 it does not sum to 0: the P recomputed here
and the forward's ``out`` (hence D) come from scores rounded in different ways (another engine or backend, an FMA
here and two roundings there, a forward in float64), and one ulp of a score of 2450 is 2.4e-4 of its probability.
The row's residual rowsum(dS) then reaches dQ times |K|, however large K is: 1e-3 for inputs of magnitude 30 whose
exact dQ is 0.19, where the naive float32 computation (consistent with itself) errs by 1e-9. Removing
(rowsum(dS) / rowsum(P)) · P K is the same as using D' = rowsum(P ∘ dP) / rowsum(P), the D of the probabilities
recomputed here, which is only known once the row has seen all its keys; one more tile product (P K_t) and the
two row sums, in float64. dK and dV keep D (D' comes too late for a key tile's sums): no sum of theirs must vanish,
so the difference moves each of their terms by about its own rounding (δ P |dP - D| |Q|), with no factor |K|.

Parallelism without races or atomics: one ``prange`` over (batch, key/value head). A work item owns every gradient
it writes: dK and dV of its key/value head, and dQ of the query heads of its group (summed over its key tiles in
increasing order), so each output element has one writer and a fixed order of summation: the results are bitwise
the same for any thread count. A key/value head's gradient sums its query heads in increasing order (GQA, no copy
of K or V). Parallel work is B x Hkv items (12 for B = 1 and 12 heads: plenty for a few cores, too few for many).

The tile products are the forward's register-blocked micro-kernel (``_gemm.matmul_tile``): K and V of a key tile
are packed transposed once, for all the query tiles that visit it. Each product's result is added into a float64
accumulator (dK, dV per key tile; dQ per head), as the forward keeps its output rows in float64.

Extra memory per thread: the dQ and P K rows of one group of heads in float64 (2 · g · L · E · 8 bytes: 16 MiB for
L = 16384, E = 64, g = 1) plus a few tiles (well under 1 MiB).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._config import HELPER, PARALLEL
from ._gemm import matmul_tile
from ._math import fast_exp


@njit(**HELPER)
def query_range(j0, tk, L, causal, causal_offset, window):
    """[i_start, i_end): the query rows that may see some key of the tile j0 .. j0 + tk - 1."""
    if not causal:
        return 0, L
    i_start = min(max(j0 - causal_offset, 0), L)  # query i sees key j0 once i + causal_offset >= j0
    i_end = L
    if window > 0:  # query i sees key j only while i + causal_offset - window < j
        i_end = min(max(j0 + tk - 1 + window - causal_offset, 0), L)
    return i_start, max(i_start, i_end)


@njit(**HELPER)
def probabilities_tile(s, scale, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                       has_key_bias, lse):
    """s (tq, tk) raw scores of queries i0.. against keys j0.. -> P = exp(scale s + masks - lse), in place.

    Hidden entries (causal, window, -inf masks) become 0; a row with lse = -inf (no key to attend to) is all 0.
    """
    tq, tk = s.shape
    zero = s.dtype.type(0.0)
    for i in range(tq):
        row = s[i]
        li = lse[i]
        if li == -np.inf:
            for j in range(tk):
                row[j] = zero
            continue
        if has_mask:
            base = b * mst[0] + h * mst[1] + (i0 + i) * mst[2] + j0 * mst[3]
            for j in range(tk):
                row[j] = row[j] * scale + mask[base + j * mst[3]]
        else:
            for j in range(tk):
                row[j] = row[j] * scale
        if has_key_bias:
            base = b * kst[0] + j0 * kst[1]
            for j in range(tk):
                row[j] += key_bias[base + j * kst[1]]
        for j in range(tk):
            row[j] = fast_exp(row[j] - li)
        if causal:
            first_hidden = min(max(i0 + i + causal_offset + 1 - j0, 0), tk)  # keys j > i + causal_offset
            for j in range(first_hidden, tk):
                row[j] = zero
            if window > 0:
                n_hidden = min(max(i0 + i + causal_offset - window + 1 - j0, 0), tk)  # keys j <= i + off - W
                for j in range(n_hidden):
                    row[j] = zero


@njit(**HELPER)
def add_into(acc, t):
    """acc (float64) += t, elementwise over (rows, cols)."""
    n, m = t.shape
    for i in range(n):
        for c in range(m):
            acc[i, c] += t[i, c]


@njit(**HELPER)
def store(o, acc):
    n, m = o.shape
    for i in range(n):
        for c in range(m):
            o[i, c] = acc[i, c]


@njit(**HELPER)
def remove_residual(dq, kbar, p_sum, ds_sum):
    """dQ rows (L, E) -= (rowsum(dS) / rowsum(P)) · (P K) rows: dS of each row made to sum to 0 (module docstring)."""
    L, E = dq.shape
    for i in range(L):
        if p_sum[i] > 0.0:  # a row with no key (or NaN) is left as it is
            c = ds_sum[i] / p_sum[i]
            for e in range(E):
                dq[i, e] -= c * kbar[i, e]


@njit(**PARALLEL)
def attention_backward(grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, scale, causal, causal_offset, window,
                       mask, mst, has_mask, key_bias, kst, has_key_bias, block_q, block_k, n_threads):
    """Fused attention backward (see the module docstring).

    grad_q (B, Hq, L, E), grad_k (B, Hkv, S, E), grad_v (B, Hkv, S, Ev) are fully written; grad_out, out
    (B, Hq, L, Ev), lse (B, Hq, L), q, k, v as the forward's. ``scale`` has the arrays' dtype; ``mask`` and
    ``key_bias`` come flat with their strides (see ``attention_fused.mask_tile``).
    """
    B, Hq, L, E = q.shape
    Hkv = k.shape[1]
    S = k.shape[2]
    Ev = v.shape[3]
    g = Hq // Hkv
    dt = q.dtype
    wide = max(E, Ev)
    dq_buf = np.empty((n_threads, g * L * E), np.float64)  # dQ rows of the work item's query heads
    kbar_buf = np.empty((n_threads, g * L * E), np.float64)  # their P K rows (the dQ residual's direction)
    d_buf = np.empty((n_threads, 3, g * L), np.float64)  # D = rowsum(grad_out * out), rowsum(P), rowsum(dS)
    kt_buf = np.empty((n_threads, E * block_k), dt)  # K_tᵀ
    vt_buf = np.empty((n_threads, Ev * block_k), dt)  # V_tᵀ
    p_buf = np.empty((n_threads, block_q * block_k), dt)  # P
    ds_buf = np.empty((n_threads, block_q * block_k), dt)  # dP, then dS
    dk_buf = np.empty((n_threads, block_k * E), np.float64)  # dK of the key tile
    dv_buf = np.empty((n_threads, block_k * Ev), np.float64)  # dV of the key tile
    tk_buf = np.empty((n_threads, block_k * wide), dt)  # one product's (tk, E or Ev) result
    tq_buf = np.empty((n_threads, block_q * E), dt)  # one product's (tq, E) result
    for w in prange(B * Hkv):
        tid = numba.get_thread_id()
        b = w // Hkv
        hk = w % Hkv
        dq = dq_buf[tid].reshape((g, L, E))
        kbar = kbar_buf[tid].reshape((g, L, E))
        d = d_buf[tid, 0].reshape((g, L))
        p_sum = d_buf[tid, 1].reshape((g, L))
        ds_sum = d_buf[tid, 2].reshape((g, L))
        for r in range(g):
            h = hk * g + r
            for i in range(L):
                for e in range(E):
                    dq[r, i, e] = 0.0
                    kbar[r, i, e] = 0.0
                p_sum[r, i] = 0.0
                ds_sum[r, i] = 0.0
                total = 0.0
                for c in range(Ev):
                    total += np.float64(grad_out[b, h, i, c]) * np.float64(out[b, h, i, c])
                d[r, i] = total
        for j0 in range(0, S, block_k):
            tk = min(block_k, S - j0)
            kt = k[b, hk, j0:j0 + tk]  # (tk, E)
            vt = v[b, hk, j0:j0 + tk]  # (tk, Ev)
            kT = kt_buf[tid, :E * tk].reshape((E, tk))
            vT = vt_buf[tid, :Ev * tk].reshape((Ev, tk))
            dk = dk_buf[tid, :tk * E].reshape((tk, E))
            dv = dv_buf[tid, :tk * Ev].reshape((tk, Ev))
            for j in range(tk):
                for e in range(E):
                    kT[e, j] = kt[j, e]
                    dk[j, e] = 0.0
                for c in range(Ev):
                    vT[c, j] = vt[j, c]
                    dv[j, c] = 0.0
            i_start, i_end = query_range(j0, tk, L, causal, causal_offset, window)
            for r in range(g):
                h = hk * g + r
                for i0 in range(i_start, i_end, block_q):
                    tq = min(block_q, i_end - i0)
                    qt = q[b, h, i0:i0 + tq]  # (tq, E)
                    dot = grad_out[b, h, i0:i0 + tq]  # (tq, Ev)
                    p = p_buf[tid, :tq * tk].reshape((tq, tk))
                    ds = ds_buf[tid, :tq * tk].reshape((tq, tk))
                    matmul_tile(p, qt, kT, False)  # raw scores Q_t K_tᵀ
                    probabilities_tile(p, scale, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask,
                                       key_bias, kst, has_key_bias, lse[b, h, i0:i0 + tq])
                    t_v = tk_buf[tid, :tk * Ev].reshape((tk, Ev))
                    matmul_tile(t_v, p.T, dot, False)  # Pᵀ dO
                    add_into(dv, t_v)
                    matmul_tile(ds, dot, vT, False)  # dP = dO V_tᵀ
                    for i in range(tq):  # dS = P (dP - D) scale, and the row sums of P and dS
                        di = dt.type(d[r, i0 + i])
                        ps = 0.0
                        dss = 0.0
                        for j in range(tk):
                            x = p[i, j] * (ds[i, j] - di) * scale
                            ds[i, j] = x
                            ps += np.float64(p[i, j])
                            dss += np.float64(x)
                        p_sum[r, i0 + i] += ps
                        ds_sum[r, i0 + i] += dss
                    t_k = tk_buf[tid, :tk * E].reshape((tk, E))
                    matmul_tile(t_k, ds.T, qt, False)  # dSᵀ Q_t
                    add_into(dk, t_k)
                    t_q = tq_buf[tid, :tq * E].reshape((tq, E))
                    matmul_tile(t_q, ds, kt, False)  # dS K_t
                    add_into(dq[r, i0:i0 + tq], t_q)
                    matmul_tile(t_q, p, kt, False)  # P K_t
                    add_into(kbar[r, i0:i0 + tq], t_q)
            store(grad_k[b, hk, j0:j0 + tk], dk)
            store(grad_v[b, hk, j0:j0 + tk], dv)
        for r in range(g):
            remove_residual(dq[r], kbar[r], p_sum[r], ds_sum[r])
            store(grad_q[b, hk * g + r], dq[r])
