"""Fused attention, flash style: softmax(scale · Q Kᵀ + masks) V without ever holding an L x S array.

The work is cut into query tiles (``block_q`` rows of one batch item and head). Each query tile walks the key
tiles (``block_k`` keys) left to right and keeps, per query row, the running max ``m`` and running sum ``l`` of the
online softmax; the output rows are the running weighted average, rescaled whenever the max grows:

    for each key tile:                                   (tiles wholly above the causal diagonal are skipped)
        s     = scale · Q_tile K_tileᵀ  (+ mask, key_bias, -inf above the diagonal)      scores
        m_new = max(m, rowmax(s));  p = exp(s - m_new);  alpha = exp(m - m_new)          online softmax
        l_new = alpha · l + rowsum(p)
        o     = (alpha · l · o + p V_tile) / l_new                                       weighted average
    (a row that saw no key at all keeps l = 0 and o = 0)

o is kept in float64 (``fold_tile``): a float32 sum over every key would let one heavy weight swallow many light
ones, and as an average o never grows past max |V|, so huge values in V cannot overflow it (a tile's own p V_tile is
kept finite by scaling p down by a power of two first, ``value_shift``).

Parallelism: one ``prange`` over the flat index (batch, head, query tile). Per-thread scratch (score tile, scaled
queries, running stats) is allocated once before the ``prange`` and picked by thread id, so the loop body allocates
nothing. Each output row is computed by exactly one thread in a fixed order, so results are bitwise identical for
any thread count. For causal attention the query tiles of a head are visited in the order 0, n-1, 1, n-2, ... so that
the contiguous chunks ``prange`` hands each thread mix cheap (top) and expensive (bottom) tiles.

Three engines share this structure and differ in the two tile products (Q Kᵀ and P V):

- ``attention_loops``: plain loops; the readable version to learn from (about 60 GFLOP/s on 2 cores).
- ``attention_blas``: ``np.dot`` on contiguous tiles, which Numba sends to SciPy's BLAS (sgemm / dgemm), made
  single-threaded once (``_config.limit_scipy_blas_threads``); about 130-190 GFLOP/s. Needs SciPy.
- ``attention_tiled`` (the default): the register-blocked micro-kernel of ``_gemm.py``, with the score tile kept
  transposed so that the online softmax vectorises along queries; about 280-380 GFLOP/s. No SciPy needed.

Extra memory: per thread ``block_q · (block_k + E + Ev + 6)`` numbers, independent of L and S (under 1 MiB).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._config import HELPER, PARALLEL
from ._gemm import matmul_tile
from ._math import fast_exp, maxnum


@njit(**HELPER)
def tile_order(u, n_tiles, causal):
    """The u-th query tile to compute: 0, 1, 2, ... or, for causal, 0, n-1, 1, n-2, ... (balanced chunks)."""
    if not causal:
        return u
    if u % 2 == 0:
        return u // 2
    return n_tiles - 1 - u // 2


@njit(**HELPER)
def key_end(i_last, S, causal, causal_offset):
    """One past the last key any row up to ``i_last`` may see."""
    if causal:
        return min(max(i_last + causal_offset + 1, 0), S)
    return S


@njit(**HELPER)
def key_start(i0, causal, causal_offset, window):
    """The first key the query row ``i0`` may see (0 without a window; the window's lower edge with one). Rows after
    i0 see no key before it, so key tiles wholly before it are skipped."""
    if causal and window > 0:
        return max(i0 + causal_offset - window + 1, 0)
    return 0


@njit(**HELPER)
def mask_tile(s, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst, has_key_bias):
    """Add the masks to the score tile s (tq, tk) of rows i0.. and keys j0..; -inf above the causal diagonal and,
    with a ``window`` W > 0, at keys j <= i + causal_offset - W (the window's lower edge).

    ``mask`` / ``key_bias`` arrive flat with their strides in elements (``mst``, ``kst``; zero for a broadcast
    axis): mask[b, h, i, j] is ``mask[b*mst[0] + h*mst[1] + i*mst[2] + j*mst[3]]``.
    """
    tq, tk = s.shape
    if causal and i0 + causal_offset < j0 + tk - 1:  # the diagonal crosses this tile
        neg_inf = s.dtype.type(-np.inf)
        for i in range(tq):
            first_hidden = max(i0 + i + causal_offset + 1 - j0, 0)
            for j in range(first_hidden, tk):
                s[i, j] = neg_inf
    if causal and window > 0 and j0 + window <= i0 + tq - 1 + causal_offset:  # the window's lower edge crosses it
        neg_inf = s.dtype.type(-np.inf)
        for i in range(tq):
            n_hidden = min(max(i0 + i + causal_offset - window + 1 - j0, 0), tk)
            for j in range(n_hidden):
                s[i, j] = neg_inf
    if has_mask:
        for i in range(tq):
            base = b * mst[0] + h * mst[1] + (i0 + i) * mst[2] + j0 * mst[3]
            for j in range(tk):
                s[i, j] += mask[base + j * mst[3]]
    if has_key_bias:
        base = b * kst[0] + j0 * kst[1]
        for i in range(tq):
            for j in range(tk):
                s[i, j] += key_bias[base + j * kst[1]]


@njit(**HELPER)
def online_softmax_tile(s, m, l, alpha, shift, unshift):
    """Turn the score tile s (tq, tk) into p = exp(s - m_new) in place and update the running stats.

    m (tq,) running row max (dtype of s), l (tq,) running row sum (float64), alpha (tq,) gets exp(m_old - m_new),
    the factor by which the output rows accumulated so far must be rescaled. ``shift`` = log(2^k), ``unshift`` = 2^k:
    p is computed as exp(s - m_new - shift) = p / 2^k, for a tile of huge values in V (see ``value_shift``); the row
    sum is scaled back (exactly) before it joins l.
    """
    tq, tk = s.shape
    zero = s.dtype.type(0.0)
    neg_inf = s.dtype.type(-np.inf)
    for i in range(tq):
        row = s[i]  # (tk,)
        m_old = m[i]
        m_tile = neg_inf
        for j in range(tk):  # rowmax (maxnum: NaN ignored here, caught below; vectorised)
            m_tile = maxnum(m_tile, row[j])
        m_new = m_tile if m_tile > m_old else m_old  # a NaN m_old stays NaN
        if m_new == neg_inf:  # no visible key yet in this row (unless a NaN hides in it)
            nan_seen = False
            for j in range(tk):
                if row[j] != row[j]:
                    nan_seen = True
            if not nan_seen:
                for j in range(tk):
                    row[j] = zero
                alpha[i] = 1.0
                continue
            m_new = s.dtype.type(np.nan)
        a = fast_exp(m_old - m_new)  # 0 when m_old = -inf
        m_sub = m_new + shift
        total = 0.0  # float64: one dominant key must not swallow many tiny ones
        for j in range(tk):  # p = exp(s - m_new - shift), rowsum
            p = fast_exp(row[j] - m_sub)
            row[j] = p
            total += p
        m[i] = m_new
        l[i] = l[i] * a + total * unshift
        alpha[i] = a


@njit(**HELPER)
def value_shift(vt, v_big, k_big):
    """k such that a tile's p·V, with p scaled down by 2^k, cannot overflow: k_big when some |v| > v_big, else 0
    (which keeps subnormal V exact). v_big = largest float / 2^(k_big + 1), 2^k_big >= keys per tile."""
    v_max = 0.0
    tk, Ev = vt.shape
    for j in range(tk):
        for c in range(Ev):
            v_max = maxnum(v_max, abs(np.float64(vt[j, c])))
    return k_big if v_max > v_big else 0.0


@njit(**HELPER)
def fold_tile(acc, pv, l_prev, alpha, l, unshift):
    """acc = (l_prev alpha acc + unshift pv) / l row by row: the output rows as a running weighted average, in float64.

    acc (tq, Ev) float64; pv (tq, Ev) this key tile's p·V (p scaled by 1 / unshift); l_prev, alpha, l (tq,). A row
    with l = 0 has seen no key yet: acc stays 0; l = NaN: NaN. Being an average, acc never grows past max |V|.
    """
    tq, Ev = acc.shape
    for i in range(tq):
        if l[i] != 0.0:
            keep = l_prev[i] * alpha[i] / l[i]
            add = unshift / l[i]
            for c in range(Ev):
                acc[i, c] = acc[i, c] * keep + pv[i, c] * add


@njit(**HELPER)
def start_query_tile(qs, qt, scale, acc, m, l):
    """Begin a query tile: qs = qt * scale, acc = 0, running max m = -inf, running sum l = 0."""
    tq, E = qt.shape
    Ev = acc.shape[1]
    for i in range(tq):
        for e in range(E):
            qs[i, e] = qt[i, e] * scale
        for c in range(Ev):
            acc[i, c] = 0.0
        m[i] = -np.inf
        l[i] = 0.0


@njit(**HELPER)
def store_rows(o, lse, acc, m, l):
    """o = acc (the averages are the outputs; a row that saw no key is still zeros), lse = m + log(l) (-inf for a
    row that saw no key: l = 0)."""
    tq, Ev = o.shape
    for i in range(tq):
        for c in range(Ev):
            o[i, c] = acc[i, c]
        if l[i] == 0.0:
            lse[i] = -np.inf
        else:
            lse[i] = np.float64(m[i]) + np.log(l[i])


@njit(**HELPER)
def prologue(q, k, v, block_q, block_k, n_threads):
    """What the three engines share before their ``prange``: the number of query tiles, the huge-V guard
    (``value_shift``: 2^k_big >= keys per tile, |V| above v_big computes p / 2^k_big) and the per-thread scratch,
    allocated once: the score / probability tile, the (scaled or transposed) query tile, p·V of one key tile, the
    float64 output rows, the running max m (+ two scratch rows) and the float64 running sum l, its value before the
    tile, the rescale factor alpha (+ one scratch row)."""
    L, E = q.shape[2], q.shape[3]
    Ev = v.shape[3]
    dt = q.dtype
    n_qt = (L + block_q - 1) // block_q
    k_big = np.ceil(np.log2(max(block_k, DIAG_K)))
    v_big = np.finfo(dt).max / 2.0 ** (k_big + 1)
    s_buf = np.empty((n_threads, block_q * max(block_k, DIAG_K)), dt)
    qs_buf = np.empty((n_threads, block_q * E), dt)
    pv_buf = np.empty((n_threads, block_q * Ev), dt)
    acc_buf = np.empty((n_threads, block_q * Ev), np.float64)
    max_buf = np.empty((n_threads, 3, block_q), dt)
    sum_buf = np.empty((n_threads, 4, block_q), np.float64)
    return n_qt, k_big, v_big, s_buf, qs_buf, pv_buf, acc_buf, max_buf, sum_buf


# ----------------------------------------------------------------------------------------------------------------
# The readable engine: tile products as loops
# ----------------------------------------------------------------------------------------------------------------
@njit(**HELPER)
def work_item(w, n_qt, Hq, g, block_q, L, S, causal, causal_offset, window):
    """(b, h, hk, i0, tq, kv_start, kv_end) of work item w: batch, query head, its key/value head, first query row,
    rows, the first key any of them sees and one past the last."""
    bh = w // n_qt
    b = bh // Hq
    h = bh % Hq
    i0 = tile_order(w % n_qt, n_qt, causal) * block_q
    tq = min(block_q, L - i0)
    return b, h, h // g, i0, tq, key_start(i0, causal, causal_offset, window), key_end(i0 + tq - 1, S, causal,
                                                                                         causal_offset)


@njit(**HELPER)
def softmax_step(s, vt, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst, has_key_bias,
                 m, l, l_prev, alpha, v_big, k_big):
    """Between the two tile products of the loops and BLAS engines: masks, then the online softmax of the score tile
    s (into p, in place), with p scaled down for a tile of huge values in V; l_prev keeps l from before. Returns the
    factor (2^k) to pass to ``fold_tile``."""
    mask_tile(s, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst, has_key_bias)
    k_shift = value_shift(vt, v_big, k_big)
    for i in range(l.shape[0]):
        l_prev[i] = l[i]
    online_softmax_tile(s, m, l, alpha, s.dtype.type(np.log(2.0) * k_shift), 2.0**k_shift)
    return 2.0**k_shift


@njit(**PARALLEL)
def attention_loops(out, lse, q, k, v, scale, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                    has_key_bias, block_q, block_k, n_threads):
    """Fused attention with the two tile products written as loops (see the module docstring).

    out (B, Hq, L, Ev), lse (B, Hq, L), q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); ``scale`` has the
    arrays' dtype. ``mask`` and ``key_bias`` come flat with their strides (see ``mask_tile``). ``n_threads`` is
    ``numba.get_num_threads()`` of the caller (calling it in here would make the kernel uncachable).

    Per key tile: s = (scale q) ktᵀ, masks, online softmax (p = exp(s - m), running m and l), pv = p vt, and pv
    folded into the output rows, kept in float64 as a running weighted average (``fold_tile``): no float32 sum over
    all keys, and no overflow with huge values in V (their tiles scale p down first, ``value_shift``).
    """
    B, Hq, L, E = q.shape
    S = k.shape[2]
    Ev = v.shape[3]
    dt = q.dtype
    n_qt, k_big, v_big, s_buf, qs_buf, pv_buf, acc_buf, max_buf, sum_buf = prologue(q, k, v, block_q, block_k,
                                                                                    n_threads)
    for w in prange(B * Hq * n_qt):
        tid = numba.get_thread_id()
        b, h, hk, i0, tq, kv_start, kv_end = work_item(w, n_qt, Hq, Hq // k.shape[1], block_q, L, S, causal,
                                                       causal_offset, window)
        qs = qs_buf[tid, :tq * E].reshape((tq, E))
        pv = pv_buf[tid, :tq * Ev].reshape((tq, Ev))
        acc = acc_buf[tid, :tq * Ev].reshape((tq, Ev))
        m, l, alpha, l_prev = max_buf[tid, 0, :tq], sum_buf[tid, 0, :tq], sum_buf[tid, 1, :tq], sum_buf[tid, 3, :tq]
        start_query_tile(qs, q[b, h, i0:i0 + tq], scale, acc, m, l)
        for j0 in range(kv_start, kv_end, block_k):
            tk = min(block_k, kv_end - j0)
            kt = k[b, hk, j0:j0 + tk]  # (tk, E)
            vt = v[b, hk, j0:j0 + tk]  # (tk, Ev)
            s = s_buf[tid, :tq * tk].reshape((tq, tk))
            for i in range(tq):  # scores: s = qs ktᵀ
                for j in range(tk):
                    dot = dt.type(0.0)
                    for e in range(E):
                        dot += qs[i, e] * kt[j, e]
                    s[i, j] = dot
            unshift = softmax_step(s, vt, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias,
                                   kst, has_key_bias, m, l, l_prev, alpha, v_big, k_big)
            for i in range(tq):  # weighted sum of this tile: pv = p vt
                for c in range(Ev):
                    pv[i, c] = 0.0
                for j in range(tk):
                    p = s[i, j]
                    for c in range(Ev):
                        pv[i, c] += p * vt[j, c]
            fold_tile(acc, pv, l_prev, alpha, l, unshift)
        store_rows(out[b, h, i0:i0 + tq], lse[b, h, i0:i0 + tq], acc, m, l)


# ----------------------------------------------------------------------------------------------------------------
# The BLAS engine: tile products through SciPy's BLAS
# ----------------------------------------------------------------------------------------------------------------
@njit(**PARALLEL)
def attention_blas(out, lse, q, k, v, scale, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                   has_key_bias, block_q, block_k, n_threads):
    """Fused attention with the tile products as ``np.dot`` (SciPy BLAS, one thread); else as ``attention_loops``."""
    B, Hq, L, E = q.shape
    S = k.shape[2]
    Ev = v.shape[3]
    n_qt, k_big, v_big, s_buf, qs_buf, pv_buf, acc_buf, max_buf, sum_buf = prologue(q, k, v, block_q, block_k,
                                                                                    n_threads)
    for w in prange(B * Hq * n_qt):
        tid = numba.get_thread_id()
        b, h, hk, i0, tq, kv_start, kv_end = work_item(w, n_qt, Hq, Hq // k.shape[1], block_q, L, S, causal,
                                                       causal_offset, window)
        qs = qs_buf[tid, :tq * E].reshape((tq, E))
        pv = pv_buf[tid, :tq * Ev].reshape((tq, Ev))
        acc = acc_buf[tid, :tq * Ev].reshape((tq, Ev))
        m, l, alpha, l_prev = max_buf[tid, 0, :tq], sum_buf[tid, 0, :tq], sum_buf[tid, 1, :tq], sum_buf[tid, 3, :tq]
        start_query_tile(qs, q[b, h, i0:i0 + tq], scale, acc, m, l)
        for j0 in range(kv_start, kv_end, block_k):
            tk = min(block_k, kv_end - j0)
            vt = v[b, hk, j0:j0 + tk]  # (tk, Ev)
            s = s_buf[tid, :tq * tk].reshape((tq, tk))
            np.dot(qs, k[b, hk, j0:j0 + tk].T, s)  # scores (BLAS)
            unshift = softmax_step(s, vt, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias,
                                   kst, has_key_bias, m, l, l_prev, alpha, v_big, k_big)
            np.dot(s, vt, pv)  # weighted sum of this tile (BLAS)
            fold_tile(acc, pv, l_prev, alpha, l, unshift)
        store_rows(out[b, h, i0:i0 + tq], lse[b, h, i0:i0 + tq], acc, m, l)


# ----------------------------------------------------------------------------------------------------------------
# The default engine: register-blocked tile products (_gemm.py), scores kept transposed
# ----------------------------------------------------------------------------------------------------------------
DIAG_K = 64  # keys per slice of the causal diagonal band
DIAG_ALIGN = 16  # a slice starts its queries at a multiple of this (whole SIMD vectors)


@njit(**HELPER)
def scale_mask_tile_t(st, scale, b, h, i0, j0, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                      has_key_bias):
    """Scale the transposed raw score tile st (tk, tq) (st[j, i]: key j0 + j against query i0 + i), add the masks,
    and put -inf above the causal diagonal.

    Scaling after the product, as the oracle does, rather than scaling Q before it: with large inputs whose
    products cancel, a pre-scaled Q adds a rounding error of the size of the terms, not of their sum.
    """
    tk, tq = st.shape
    for j in range(tk):
        row = st[j]
        for i in range(tq):
            row[i] *= scale
    if has_mask:
        for j in range(tk):
            base = b * mst[0] + h * mst[1] + i0 * mst[2] + (j0 + j) * mst[3]
            for i in range(tq):
                st[j, i] += mask[base + i * mst[2]]
    if has_key_bias:
        for j in range(tk):
            bias = key_bias[b * kst[0] + (j0 + j) * kst[1]]
            for i in range(tq):
                st[j, i] += bias
    if causal and i0 + causal_offset < j0 + tk - 1:  # the diagonal crosses this tile
        neg_inf = st.dtype.type(-np.inf)
        for j in range(tk):
            n_hidden = min(max(j0 + j - causal_offset - i0, 0), tq)  # queries i < n_hidden may not see key j
            for i in range(n_hidden):
                st[j, i] = neg_inf
    if causal and window > 0 and j0 + window <= i0 + tq - 1 + causal_offset:  # the window's lower edge crosses it
        neg_inf = st.dtype.type(-np.inf)
        for j in range(tk):
            first_hidden = min(max(j0 + j + window - causal_offset - i0, 0), tq)  # queries i >= this may not see j
            for i in range(first_hidden, tq):
                st[j, i] = neg_inf


@njit(**HELPER)
def online_softmax_tile_t(st, m, l, alpha, m_tile, m_sub, l_tile, shift, unshift):
    """``online_softmax_tile`` for a transposed tile st (tk, tq): every step runs along the tq queries of a key
    row, so all of it vectorises (elementwise max, exp and sums; no horizontal reductions).

    m (tq,) running max, l (tq,) running sum (float64), alpha (tq,) rescale factor (float64);
    m_tile, m_sub (tq,) (dtype of st) and l_tile (tq,) (float64) are scratch. Sums are float64: one dominant key and
    many tiny ones must not lose the tiny ones; two key rows at a time halve the cost of the wide sum.

    ``shift`` = log(2^k), ``unshift`` = 2^k: p is computed as exp(s - m_new - shift) = p / 2^k. With 2^k >= tk a
    tile's p·V, a sum of tk terms, cannot overflow even when |V| is near the largest float; the caller uses k > 0
    only then (k = 0 keeps subnormal V exact). The tile sum is scaled back by 2^k (exact) before it joins l.
    """
    tk, tq = st.shape
    neg_inf = st.dtype.type(-np.inf)
    for i in range(tq):
        m_tile[i] = neg_inf
        l_tile[i] = 0.0
    for j in range(tk):  # column max
        row = st[j]
        for i in range(tq):
            m_tile[i] = maxnum(m_tile[i], row[i])
    for i in range(tq):  # new running max, and what to subtract
        m_old = m[i]
        m_new = m_tile[i] if m_tile[i] > m_old else m_old  # a NaN m_old stays NaN
        if m_new == neg_inf:  # no visible key yet for this query (unless a NaN hides in the column)
            for j in range(tk):
                if st[j, i] != st[j, i]:
                    m_new = st.dtype.type(np.nan)
        if m_new == neg_inf:
            m_sub[i] = 0.0  # exp(-inf - 0) = 0: the column gives p = 0 and leaves o, l unchanged
            alpha[i] = 1.0
        else:
            m_sub[i] = m_new + shift
            alpha[i] = fast_exp(m_old - m_new)  # 0 when m_old = -inf
        m[i] = m_new
    for j in range(0, tk - 1, 2):  # p = exp(s - m_new); column sums (float64), two key rows at a time
        row0 = st[j]
        row1 = st[j + 1]
        for i in range(tq):
            p0 = fast_exp(row0[i] - m_sub[i])
            p1 = fast_exp(row1[i] - m_sub[i])
            row0[i] = p0
            row1[i] = p1
            l_tile[i] += np.float64(p0) + np.float64(p1)
    if tk % 2 == 1:
        row = st[tk - 1]
        for i in range(tq):
            p = fast_exp(row[i] - m_sub[i])
            row[i] = p
            l_tile[i] += p
    for i in range(tq):
        l[i] = l[i] * alpha[i] + l_tile[i] * unshift


@njit(**PARALLEL)
def attention_tiled(out, lse, q, k, v, scale, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                    has_key_bias, block_q, block_k, n_threads):
    """Fused attention with register-blocked tile products (``_gemm.matmul_tile``); same arguments as
    ``attention_loops``.

    The score tile is kept transposed, st = K_tile · (scale Q_tile)ᵀ of shape (tk, tq): then the online softmax runs
    along rows of queries (vectorised, see ``online_softmax_tile_t``), the scaled query tile is packed (transposed)
    once per query tile and never a key tile, and the weighted sum reads p = stᵀ through strides.

    Causal: key tiles that every query of the tile sees go in blocks of ``block_k``; the band of keys that crosses
    the diagonal goes in slices of ``DIAG_K`` keys, each against only the queries that see some of its keys, so
    little work is spent on scores that are then hidden. A window's lower edge is masked (tiles wholly before it
    are skipped).
    """
    B, Hq, L, E = q.shape
    Hkv = k.shape[1]
    S = k.shape[2]
    Ev = v.shape[3]
    g = Hq // Hkv
    dt = q.dtype
    n_qt, k_big, v_big, s_buf, qs_buf, pv_buf, acc_buf, max_buf, sum_buf = prologue(q, k, v, block_q, block_k,
                                                                                    n_threads)
    for w in prange(B * Hq * n_qt):
        tid = numba.get_thread_id()
        b, h, hk, i0, tq, kv_start, kv_end = work_item(w, n_qt, Hq, g, block_q, L, S, causal, causal_offset, window)
        qt = q[b, h, i0:i0 + tq]  # (tq, E)
        o = out[b, h, i0:i0 + tq]  # (tq, Ev)
        qst = qs_buf[tid, :E * tq].reshape((E, tq))
        pv = pv_buf[tid, :tq * Ev].reshape((tq, Ev))
        acc = acc_buf[tid, :tq * Ev].reshape((tq, Ev))
        m = max_buf[tid, 0, :tq]
        l = sum_buf[tid, 0, :tq]
        alpha = sum_buf[tid, 1, :tq]
        l_prev = sum_buf[tid, 3, :tq]
        for i in range(tq):
            for e in range(E):
                qst[e, i] = qt[i, e]
            for c in range(Ev):
                acc[i, c] = 0.0
            m[i] = -np.inf
            l[i] = 0.0
        # keys [0, j_band) are seen by every query of the tile: tiles of block_k keys. Keys [j_band, kv_end) form
        # the causal diagonal band: slices of DIAG_K keys, each against only the queries c0.. that see any of them.
        j_band = min(max(i0 + causal_offset + 1, 0), kv_end) if causal else kv_end
        j0 = kv_start
        while j0 < kv_end:
            if j0 < j_band:
                tk = min(block_k, j_band - j0)
                c0 = 0
            else:
                tk = min(DIAG_K, kv_end - j0)
                c0 = min(max(j0 - causal_offset - i0, 0) // DIAG_ALIGN * DIAG_ALIGN, tq - 1)  # queries < c0: hidden
            nq = tq - c0
            kt = k[b, hk, j0:j0 + tk]  # (tk, E)
            vt = v[b, hk, j0:j0 + tk]  # (tk, Ev)
            st = s_buf[tid, :tk * nq].reshape((tk, nq))
            matmul_tile(st, kt, qst[:, c0:], False)  # raw scores, transposed: st = kt qtᵀ
            scale_mask_tile_t(st, scale, b, h, i0 + c0, j0, causal, causal_offset, window, mask, mst, has_mask,
                              key_bias, kst, has_key_bias)
            k_shift = value_shift(vt, v_big, k_big)  # huge values: keep p V from overflowing
            for i in range(c0, tq):
                l_prev[i] = l[i]
            online_softmax_tile_t(st, m[c0:], l[c0:], alpha[c0:], max_buf[tid, 1, c0:tq], max_buf[tid, 2, c0:tq],
                                  sum_buf[tid, 2, c0:tq], dt.type(np.log(2.0) * k_shift), 2.0 ** k_shift)
            matmul_tile(pv[c0:], st.T, vt, False)  # weighted sum of this tile: pv = p vt
            fold_tile(acc[c0:], pv[c0:], l_prev[c0:], alpha[c0:], l[c0:], 2.0**k_shift)  # the running average
            j0 += tk
        store_rows(o, lse[b, h, i0:i0 + tq], acc, m, l)  # a query that saw no key (l = 0) gets zeros, lse -inf


# ----------------------------------------------------------------------------------------------------------------
# Decoding: one query row, the keys split across threads
# ----------------------------------------------------------------------------------------------------------------
@njit(**PARALLEL)
def attention_decode(out, lse, q, k, v, scale, causal, causal_offset, window, mask, mst, has_mask, key_bias, kst,
                     has_key_bias, part, n_threads):
    """Fused attention for L == 1 (a decoding step) with the keys cut into parts of ``part`` keys, so that a few
    (batch, head) rows still keep every thread busy. Same arguments as ``attention_loops``.

    Each work item (row, part) computes, over its keys only, the row max m_p, the sum l_p = Σ exp(s - m_p) and the
    weighted average a_p = Σ exp(s - m_p) v / l_p (float64; an average never grows past max |V|, so huge values
    cannot overflow). Then each row merges its parts in increasing order by log-sum-exp:
    M = max m_p, l = Σ l_p exp(m_p - M), out = Σ (l_p exp(m_p - M) / l) a_p, lse = M + log l.
    The number of parts depends on S and ``part`` only, never on the thread count, and every sum runs in a fixed
    order: bitwise the same results for any thread count.
    """
    B, Hq, L, E = q.shape
    S = k.shape[2]
    Ev = v.shape[3]
    g = Hq // k.shape[1]
    rows = B * Hq
    n_parts = (S + part - 1) // part
    m_part = np.empty((rows, n_parts), np.float64)
    l_part = np.empty((rows, n_parts), np.float64)
    a_part = np.empty((rows, n_parts, Ev), np.float64)
    s_buf = np.empty((n_threads, part), np.float64)
    for w in prange(rows * n_parts):
        tid = numba.get_thread_id()
        row = w // n_parts
        pi = w % n_parts
        b = row // Hq
        h = row % Hq
        hk = h // g
        lo = pi * part
        hi = min(S, lo + part)
        if causal:  # query 0 sees keys causal_offset - window < j <= causal_offset
            hi = min(hi, max(causal_offset + 1, 0))
            if window > 0:
                lo = max(lo, causal_offset - window + 1)
        acc = a_part[row, pi]
        for c in range(Ev):
            acc[c] = 0.0
        m_part[row, pi] = -np.inf
        l_part[row, pi] = 0.0
        if hi <= lo:
            continue
        s = s_buf[tid, :hi - lo]
        qi = q[b, h, 0]
        m = -np.inf
        nan_seen = False
        for j in range(lo, hi):  # scores, and their max
            dot = q.dtype.type(0.0)
            kj = k[b, hk, j]
            for e in range(E):
                dot += qi[e] * kj[e]
            x = np.float64(dot * scale)
            if has_mask:
                x += mask[b * mst[0] + h * mst[1] + j * mst[3]]
            if has_key_bias:
                x += key_bias[b * kst[0] + j * kst[1]]
            s[j - lo] = x
            m = maxnum(m, x)
            if x != x:
                nan_seen = True
        if nan_seen:
            m = np.nan
        if m == -np.inf:  # no visible key in this part
            continue
        total = 0.0
        for j in range(hi - lo):  # p = exp(s - m), the sum
            p = np.exp(s[j] - m)
            s[j] = p
            total += p
        inv = 1.0 / total
        for j in range(hi - lo):  # the weighted average of this part's values
            p = s[j] * inv
            vj = v[b, hk, lo + j]
            for c in range(Ev):
                acc[c] += p * vj[c]
        m_part[row, pi] = m
        l_part[row, pi] = total
    for row in prange(rows):  # merge each row's parts, in increasing order
        b = row // Hq
        h = row % Hq
        big = -np.inf
        nan_seen = False
        for pi in range(n_parts):
            big = maxnum(big, m_part[row, pi])
            if m_part[row, pi] != m_part[row, pi]:
                nan_seen = True
        o = out[b, h, 0]
        if nan_seen:
            for c in range(Ev):
                o[c] = np.nan
            lse[b, h, 0] = np.nan
            continue
        if big == -np.inf:  # no key to attend to
            for c in range(Ev):
                o[c] = 0.0
            lse[b, h, 0] = -np.inf
            continue
        total = 0.0
        for pi in range(n_parts):
            total += l_part[row, pi] * np.exp(m_part[row, pi] - big)
        for c in range(Ev):
            x = 0.0
            for pi in range(n_parts):
                x += (l_part[row, pi] * np.exp(m_part[row, pi] - big) / total) * a_part[row, pi, c]
            o[c] = x
        lse[b, h, 0] = big + np.log(total)
