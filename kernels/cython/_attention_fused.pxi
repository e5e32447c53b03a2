# The fused, flash-style attention kernels (textually included by _attention.pyx). attention: an online softmax
# over key tiles, one work item per (head, query tile), or per part of the keys when decoding; lse saved for the
# backward. attention_backward: P recomputed from lse tile by tile, dQ, dK, dV summed in double. Never an L×S array.

cdef Py_ssize_t _DIAG_ROWS = 64   # on the causal diagonal, query rows go in groups of this many


# Phase counters (``phase_profile``): when on, each block of the fused forward adds the clock ticks of its four
# phases to these totals, summed over the threads: the scores' tile product, the online softmax pass (masks, max,
# exp, sum, the rescale factors), the P·V tile product, and folding P·V into the running output. Off (the default)
# it costs one test of a global per block. The clock is the time-stamp counter on x86 (constant rate: shares are
# shares of time), else a monotonic clock in nanoseconds.
cdef extern from *:
    """
    #if defined(__x86_64__) || defined(__i386__)
    #include <x86intrin.h>
    static inline unsigned long long fa_ticks(void) { return __rdtsc(); }
    #else
    #include <time.h>
    static inline unsigned long long fa_ticks(void) {
        struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
        return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
    }
    #endif
    static unsigned long long fa_phase_ticks[4] = {0, 0, 0, 0};
    static int fa_phase_on = 0;
    static inline void fa_phase_add(int phase, unsigned long long ticks) {
        __atomic_fetch_add(&fa_phase_ticks[phase], ticks, __ATOMIC_RELAXED);
    }
    """
    unsigned long long fa_ticks() noexcept nogil
    unsigned long long fa_phase_ticks[4]
    int fa_phase_on
    void fa_phase_add(int phase, unsigned long long ticks) noexcept nogil

PHASES = ("scores product", "softmax pass", "P·V product", "fold into output")


def phase_profile(on=None):
    """Phase counters of the fused forward: ``phase_profile(True)`` zeroes and starts them, ``phase_profile(False)``
    stops them; returns the ticks so far per phase (a dict in ``PHASES`` order, summed over threads)."""
    global fa_phase_on
    if on is not None:
        if on:
            for i in range(4):
                fa_phase_ticks[i] = 0
        fa_phase_on = 1 if on else 0
    return {name: int(fa_phase_ticks[i]) for i, name in enumerate(PHASES)}


cdef inline floating _fabs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline double _abs_max(const floating* x, Py_ssize_t n) noexcept nogil:
    """max |x[j]| over j < n, ignoring NaN (0 when n == 0); LANES partial results so that it vectorises."""
    cdef floating acc[LANES]
    cdef floating a
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = n - n % LANES
    for u in range(LANES):
        acc[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            a = _fabs(x[j * LANES + u])
            acc[u] = a if a > acc[u] else acc[u]
    for j in range(nfull, n):
        a = _fabs(x[j])
        acc[0] = a if a > acc[0] else acc[0]
    for u in range(1, LANES):
        acc[0] = acc[u] if acc[u] > acc[0] else acc[0]
    return acc[0]


cdef struct Tile:
    # per-thread scratch of the fused kernel, for one query tile (nq <= BQ rows); the void* hold `floating`
    void* s               # BQ×BK scores, then probabilities
    void* bt              # micro-kernel and loops: E×(BK + 32) (transposed K tile) and BK doubles
    double* acc           # BQ×Ev: the output rows, a running weighted average
    double* m             # BQ: running row max
    double* l             # BQ: running row sum
    double* keep          # BQ: factor of the old average in the new one, l_old·alpha / l_new
    double* add           # BQ: factor of this tile's P·V in it, up / l_new


cdef void _fold_pv_loops(double* acc, const floating* p, Py_ssize_t nq, Py_ssize_t nk, const floating* v,
                         Py_ssize_t Ev, const double* keep, const double* add, const double* l) noexcept nogil:
    """acc[r] = acc[r]·keep[r] + Σ_j (p[r, j]·add[r])·v[j] for the rows with l[r] != 0 (p: nq×nk, v: nk×Ev).

    The loops' P·V, folded straight into the running average: the weights p·add sum to at most 1, so nothing can
    overflow, even with huge V. Keys go in groups of 4, whose products are summed in the dtype (FMAs on whole
    vectors) and then added into double: the error stays within a few 2^-24 of Σ|p·v| however many keys.
    """
    cdef Py_ssize_t r, c, j
    cdef double kr, ar, wj
    cdef floating w0, w1, w2, w3
    cdef double* arow
    cdef const floating* prow
    cdef const floating* v0
    cdef const floating* v1
    cdef const floating* v2
    cdef const floating* v3
    for r in range(nq):
        if l[r] == 0.0:
            continue
        kr = keep[r]
        ar = add[r]
        arow = acc + r * Ev
        prow = p + r * nk
        for c in range(Ev):
            arow[c] = arow[c] * kr
        j = 0
        while j + 4 <= nk:
            w0 = <floating>(prow[j] * ar)
            w1 = <floating>(prow[j + 1] * ar)
            w2 = <floating>(prow[j + 2] * ar)
            w3 = <floating>(prow[j + 3] * ar)
            v0 = v + j * Ev
            v1 = v0 + Ev
            v2 = v1 + Ev
            v3 = v2 + Ev
            for c in range(Ev):
                arow[c] = arow[c] + <double>(w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c])
            j += 4
        while j < nk:
            wj = prow[j] * ar
            v0 = v + j * Ev
            for c in range(Ev):
                arow[c] = arow[c] + wj * v0[c]
            j += 1


cdef void _attend_block(double* acc, floating* pv, const floating* q, const floating* k, const floating* v,
                        Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t j0, Py_ssize_t nk,
                        Py_ssize_t E, Py_ssize_t Ev, floating scale, double up, const Masks* mk,
                        const Tile* t, Py_ssize_t r0, int tiles) noexcept nogil:
    """One block of the online softmax: queries i0..i0+nq-1 (rows q, acc, pv; rows r0.. of t.m, t.l, ...) against
    keys j0..j0+nk-1. pv (nq×Ev; micro-kernel and BLAS) receives the tile product P·V: the caller passes the output
    rows.

    m, l: running max and sum of each row; acc: its output so far, kept as a weighted average (already divided by
    l), so that it never grows past the largest |V|:  acc = acc·(alpha·l_old / l_new) + (P·V)·(1 / l_new),
    alpha = exp(m_old - m_new). Micro-kernel and BLAS: P·V is one float32 (or float64) product per tile, added into
    the double acc; the loops fold P·V into acc themselves (_fold_pv_loops).
    up > 1 (micro-kernel and BLAS, a tile of huge V, up = 2^k >= 2·nk): P is divided by up before the product
    (exactly: a power of two), so that its P·V, at most nk·max|V| / up, cannot overflow; the factor up / l_new puts
    it back.
    """
    cdef Py_ssize_t r, c
    cdef double m_new, m_old, tile_max, ref, alpha, l_old, l_new, kr, ar
    cdef floating down = <floating>(1.0 / up)
    cdef floating* s = <floating*>t.s
    cdef floating* srow
    cdef const floating* pvrow
    cdef double* arow
    cdef double* m = t.m + r0
    cdef double* l = t.l + r0
    cdef double* keep = t.keep + r0
    cdef double* add = t.add + r0
    cdef Py_ssize_t nvis
    cdef bint timed = fa_phase_on != 0
    cdef unsigned long long t0 = fa_ticks() if timed else 0, t1
    # 1. scores: s[r, c] = scale·⟨q[r], k[j0 + c]⟩ + masks
    _gemm_nt(nq, nk, E, scale, q, E, k + j0 * E, E, s, nk, <floating*>t.bt, tiles)
    if timed:
        t1 = fa_ticks()
        fa_phase_add(0, t1 - t0)
        t0 = t1
    # 2. online softmax: s[r] becomes exp(s - ref); m, l and the two factors of step 3 follow
    for r in range(nq):
        srow = s + r * nk
        nvis = nk                       # causal: the row sees keys j0 .. j0 + nvis - 1 of the tile, the rest get p = 0
        if mk.causal:
            nvis = i0 + r + mk.causal_offset + 1 - j0
            nvis = 0 if nvis < 0 else (nk if nvis > nk else nvis)
        if _row_needs_mask(i0 + r, j0, nvis, mk):
            _mask_row(srow, nvis, b, h, i0 + r, j0, mk)
        tile_max = row_max(srow, nvis)
        m_old = m[r]
        m_new = tile_max if tile_max > m_old else m_old
        if m_new == -INFINITY:          # nothing visible yet: exp(s - 0) is 0 (or NaN for a NaN score)
            ref, alpha = 0.0, 1.0
        else:
            ref = m_new
            if m_old == m_new:
                alpha = 1.0             # the usual case once the max has settled: no call to exp
            elif m_old == -INFINITY:
                alpha = 0.0             # first visible key: the sum restarts
            else:
                alpha = exp(m_old - m_new)
        l_old = l[r]
        l_new = l_old * alpha + exp_shift_sum(srow, nvis, ref)
        for c in range(nvis, nk):       # the hidden keys: no max, no exp, a zero weight for the P·V product
            srow[c] = 0
        l[r] = l_new
        m[r] = m_new
        if l_new != 0.0:                # (NaN included: the row stays NaN)
            keep[r] = l_old * alpha / l_new
            add[r] = up / l_new
        if up != 1.0:                   # huge V: p / up for the gemm (rare)
            for c in range(nvis):
                srow[c] = srow[c] * down
    if timed:
        t1 = fa_ticks()
        fa_phase_add(1, t1 - t0)
        t0 = t1
    # 3. weighted sum of this tile folded into the running average (rows with l = 0 saw no key: acc stays 0)
    if tiles == TILES_LOOPS:
        _fold_pv_loops(acc, s, nq, nk, v + j0 * Ev, Ev, keep, add, l)
        if timed:
            fa_phase_add(2, fa_ticks() - t0)   # the loops multiply and fold in one pass: all of it as P·V
        return
    _gemm_nn(nq, Ev, nk, s, nk, v + j0 * Ev, Ev, pv, Ev, NULL, tiles)
    if timed:
        t1 = fa_ticks()
        fa_phase_add(2, t1 - t0)
        t0 = t1
    for r in range(nq):
        if l[r] != 0.0:
            kr = keep[r]
            ar = add[r]
            arow = acc + r * Ev
            pvrow = pv + r * Ev
            for c in range(Ev):
                arow[c] = arow[c] * kr + pvrow[c] * ar
    if timed:
        fa_phase_add(3, fa_ticks() - t0)


cdef void _attend_query_tile(floating* o, floating* lse, const floating* q, const floating* k, const floating* v,
                             Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t j_lo, Py_ssize_t S,
                             Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ, Py_ssize_t BK, floating scale,
                             double v_big, double up_big, const Masks* mk, floating* fbuf, double* dbuf,
                             floating* bt, int tiles) noexcept nogil:
    """o[0:nq] = softmax(scale·q kᵀ + masks) v for queries i0..i0+nq-1 of head (b, h), key tile by key tile;
    lse[0:nq] = the log-sum-exp of their scaled, masked scores (-inf for a row that sees no key).
    Only keys j_lo..S-1 take part (j_lo = 0 but for a part of a split decoding step).

    q: nq×E rows of this head; k: S×E, v: S×Ev of its key/value head; o: nq×Ev rows of out. The output rows are
    accumulated in double (Tile.acc) and written once at the end; until then o holds each key tile's P·V
    (micro-kernel, BLAS). Per-thread scratch (see Tile): fbuf (BQ·BK floating), dbuf (BQ·Ev + 4·BQ doubles), bt
    (micro-kernel and loops: E×(BK + 32) floating and BK doubles).
    Causal: key tiles past the last visible key are skipped; a tile that crosses the diagonal is split into
    groups of _DIAG_ROWS rows, each computing only the keys its last row sees. Window: the key tiles start at the
    first key the first row sees (_visible_start); the rows hide the keys below their band (_mask_row).
    Huge values (micro-kernel, BLAS): a key tile whose max |V| exceeds v_big has its P scaled down by up_big
    (see _attend_block).
    """
    cdef Py_ssize_t end = _visible_end(i0 + nq - 1, S, mk)
    cdef Py_ssize_t start = max(_visible_start(i0, end, mk), min(j_lo, end))
    cdef Py_ssize_t jt, j0, nk, r, c, g, r0, ng, nk_g
    cdef double up = 1.0
    cdef floating* orow
    cdef double* arow
    cdef Tile t
    t.s = fbuf
    t.bt = bt
    t.acc = dbuf
    t.m = dbuf + BQ * Ev
    t.l = t.m + BQ
    t.keep = t.l + BQ
    t.add = t.keep + BQ
    for r in range(nq):
        t.m[r] = -INFINITY
        t.l[r] = 0.0
    memset(t.acc, 0, nq * Ev * sizeof(double))
    for jt in range((end - start + BK - 1) // BK):
        j0 = start + jt * BK
        nk = min(BK, end - j0)
        if tiles != TILES_LOOPS:
            up = up_big if _abs_max(v + j0 * Ev, nk * Ev) > v_big else 1.0
        if not mk.causal or j0 + nk - 1 <= i0 + mk.causal_offset:     # every row sees the whole tile
            _attend_block(t.acc, o, q, k, v, b, h, i0, nq, j0, nk, E, Ev, scale, up, mk, &t, 0, tiles)
            continue
        for g in range((nq + _DIAG_ROWS - 1) // _DIAG_ROWS):
            r0 = g * _DIAG_ROWS
            ng = min(_DIAG_ROWS, nq - r0)
            nk_g = min(nk, i0 + r0 + ng + mk.causal_offset - j0)       # keys up to the group's last row
            if nk_g > 0:                 # rows that see no key of this tile see none later either
                _attend_block(t.acc + r0 * Ev, o + r0 * Ev, q + r0 * E, k, v, b, h, i0 + r0, ng, j0, nk_g,
                              E, Ev, scale, up, mk, &t, r0, tiles)
    # the averages are the outputs; a row that saw no key is still zeros, a NaN row is NaN
    for r in range(nq):
        orow = o + r * Ev
        arow = t.acc + r * Ev
        for c in range(Ev):
            orow[c] = <floating>arow[c]
        lse[r] = <floating>(-INFINITY if t.l[r] == 0.0 else t.m[r] + log(t.l[r]))   # a NaN row: NaN


def attention(floating[:, :, :, ::1] out, floating[:, :, ::1] lse, const floating[:, :, :, ::1] q,
              const floating[:, :, :, ::1] k, const floating[:, :, :, ::1] v, double scale, bint causal,
              Py_ssize_t causal_offset, Py_ssize_t window, const floating[:, :, :, :] mask, bint has_mask,
              const floating[:, :] key_bias, bint has_key_bias):
    """out = softmax(scale·QKᵀ + masks) V per head, fused: O(N) extra memory, never an L×S array; lse = the
    log-sum-exp of each row's scaled, masked scores (-inf for a row with no key to attend to)."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2], Ev = v.shape[3]
    if B * Hq * L == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * (E + Ev), L, max(L, S, E, Ev), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ, BK = plan.BK
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ, n_bh = B * Hq
    # Huge values (micro-kernel, BLAS): a key tile's product P·V sums up to BK terms p·v with p <= 1; with
    # |V| <= v_big it stays below half the largest float. Above, P is divided by up_big = 2^k >= 2·BK first (see
    # _attend_block).
    # (The loops need neither: they fold P·V with weights p / l, which sum to at most 1.)
    cdef double up_big = 2.0
    while up_big < 2 * BK:
        up_big *= 2
    cdef double v_big = (FLT_MAX if floating is float else DBL_MAX) / up_big
    cdef floating alpha_scale = <floating>scale
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef const floating* vp = &v[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0] if Ev > 0 else NULL
    cdef floating* lp = &lse[0, 0, 0]
    # Decoding (one query row, few heads): the keys are split into n_parts parts, each a work item with its own
    # output and lse (po, pl), merged by log-sum-exp below in part order. n_parts follows from the shapes only.
    cdef Py_ssize_t n_parts = 1, chunk = S, p
    if L == 1 and n_bh < _DECODE_ITEMS:
        n_parts = max(1, min((_DECODE_ITEMS + n_bh - 1) // n_bh, S // _DECODE_MIN_KEYS))
    if n_parts > 1:
        chunk = ((S + n_parts - 1) // n_parts + 63) // 64 * 64
        n_parts = (S + chunk - 1) // chunk
    cdef floating* po = NULL
    cdef floating* pl = NULL
    if n_parts > 1:
        po = <floating*>malloc((n_bh * n_parts * Ev + 1) * sizeof(floating))
        pl = <floating*>malloc(n_bh * n_parts * sizeof(floating))
        if po == NULL or pl == NULL:
            free(po)
            free(pl)
            raise MemoryError("attention: no memory for the parts of a decoding step")
    cdef Py_ssize_t w, bh, b, h, i0, nq, item
    cdef floating* fbuf = NULL
    cdef double* dbuf = NULL
    cdef floating* bt = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        # per-thread scratch, see Tile: floating s; double acc, m, l, keep, add; bt (Kᵀ tile: not with BLAS)
        fbuf = <floating*>malloc(BQ * BK * sizeof(floating) + 64)
        dbuf = <double*>malloc((BQ * Ev + 4 * BQ) * sizeof(double))
        bt = NULL
        if tiles != TILES_BLAS:
            bt = <floating*>malloc(E * (BK + 32) * sizeof(floating) + BK * sizeof(double) + 64)
        # Work items: (query tile, head). Largest query tiles first, so that under causal masking the
        # dynamic schedule ends with the cheap tiles and the threads finish together.
        for w in prange(n_bh * n_qt * n_parts, schedule="dynamic"):
            if fbuf == NULL or dbuf == NULL or (bt == NULL and tiles != TILES_BLAS):
                failed_flag[0] = 1
                continue
            p = w % n_parts
            item = w // n_parts
            bh = item % n_bh
            b = bh // Hq
            h = bh % Hq
            i0 = (n_qt - 1 - item // n_bh) * BQ
            nq = min(BQ, L - i0)
            if n_parts == 1:
                _attend_query_tile(op + (bh * L + i0) * Ev, lp + bh * L + i0, qp + (bh * L + i0) * E,
                                   kp + (b * Hkv + h // group) * S * E, vp + (b * Hkv + h // group) * S * Ev,
                                   b, h, i0, nq, 0, S, E, Ev, BQ, BK, alpha_scale, v_big, up_big, &mk,
                                   fbuf, dbuf, bt, tiles)
            else:                                   # part p of a decoding step: keys p·chunk .. (p + 1)·chunk - 1
                _attend_query_tile(po + (bh * n_parts + p) * Ev, pl + bh * n_parts + p, qp + bh * E,
                                   kp + (b * Hkv + h // group) * S * E, vp + (b * Hkv + h // group) * S * Ev,
                                   b, h, 0, 1, p * chunk, min(S, (p + 1) * chunk), E, Ev, BQ, BK, alpha_scale,
                                   v_big, up_big, &mk, fbuf, dbuf, bt, tiles)
        free(fbuf)
        free(dbuf)
        free(bt)
    if failed:
        free(po)
        free(pl)
        raise MemoryError("attention: no memory for the per-thread tile buffers")
    if n_parts > 1:
        with nogil:
            _merge_parts(op, lp, po, pl, n_bh, n_parts, Ev)
        free(po)
        free(pl)


cdef Py_ssize_t _DECODE_ITEMS = 16       # decoding with fewer heads than this splits the keys ...
cdef Py_ssize_t _DECODE_MIN_KEYS = 512   # ... into parts of at least this many keys


cdef void _merge_parts(floating* out, floating* lse, const floating* po, const floating* pl, Py_ssize_t n_bh,
                       Py_ssize_t n_parts, Py_ssize_t Ev) noexcept nogil:
    """out[bh] = Σ_p exp(pl[bh, p] - lse[bh])·po[bh, p], lse[bh] = log Σ_p exp(pl[bh, p]): the parts of a split
    decoding step merged by log-sum-exp, in part order, in double (a part that saw no key has pl = -inf: weight 0)."""
    cdef Py_ssize_t bh, p, c
    cdef double mx, total, wp
    cdef bint nan
    for bh in range(n_bh):
        mx = -INFINITY
        nan = False
        for p in range(n_parts):
            nan = nan or pl[bh * n_parts + p] != pl[bh * n_parts + p]
            if pl[bh * n_parts + p] > mx:
                mx = pl[bh * n_parts + p]
        if nan:                             # a NaN in the query row stays in its row
            lse[bh] = <floating>NAN
            for c in range(Ev):
                out[bh * Ev + c] = <floating>NAN
            continue
        if mx == -INFINITY:                 # no part saw a key
            lse[bh] = <floating>(-INFINITY)
            for c in range(Ev):
                out[bh * Ev + c] = 0
            continue
        total = 0
        for p in range(n_parts):
            total = total + exp(pl[bh * n_parts + p] - mx)
        for c in range(Ev):
            wp = 0
            for p in range(n_parts):
                wp = wp + exp(pl[bh * n_parts + p] - mx) * po[(bh * n_parts + p) * Ev + c]
            out[bh * Ev + c] = <floating>(wp / total)
        lse[bh] = <floating>(mx + log(total))


# ---------------------------------------------------------------------------------------------------------------
# Fused attention backward
# ---------------------------------------------------------------------------------------------------------------

# Tile shape of the backward (query rows BQ × keys BK); _set_backward_tiles tries others.
cdef Py_ssize_t _BWD_BQ = 128
cdef Py_ssize_t _BWD_BK = 128
# From this many (batch, key/value head) pairs on, one pass: each pair is a work item that owns all its gradients.
# Fewer (a long sequence with few heads): two passes, over key tiles (grad_k, grad_v) and over query tiles (grad_q),
# recomputing P and dP in each (7/5 of the work, but as many work items as tiles). The choice depends on the shapes
# only, so that the result does not depend on the thread count.
cdef Py_ssize_t _BWD_ONE_PASS_ITEMS = 8


def _set_backward_tiles(Py_ssize_t bq, Py_ssize_t bk, Py_ssize_t one_pass_items=-1):
    """Set the tile shape (query rows, keys) of attention_backward, and (when >= 0) the number of (batch,
    key/value head) pairs from which it runs in one pass; returns the previous settings. For tuning and tests."""
    global _BWD_BQ, _BWD_BK, _BWD_ONE_PASS_ITEMS
    if bq < 1 or bk < 1:
        raise ValueError(f"_set_backward_tiles: tile sizes must be >= 1, got {bq}×{bk}")
    previous = (_BWD_BQ, _BWD_BK, _BWD_ONE_PASS_ITEMS)
    _BWD_BQ, _BWD_BK = bq, bk
    if one_pass_items >= 0:
        _BWD_ONE_PASS_ITEMS = one_pass_items
    return previous


cdef struct BwdTile:
    # per-thread scratch of attention_backward; the void* hold `floating`
    void* s               # BQ×BK scores, then probabilities P
    void* dp              # BQ×BK dP = dO·Vᵀ, then dS
    void* prod            # one tile product: BK×max(E, Ev) or BQ×E
    void* kt              # Kᵀ of the key tile, E×(BK + 32)
    void* vt              # Vᵀ of the key tile, Ev×(BK + 32)
    double* dk            # BK×E: dK of the key tile, summed over the query tiles
    double* dv            # BK×Ev: dV of the key tile
    double* dq            # R×E: dQ of R query rows (one pass: the head's L rows; two passes: a query tile)
    double* kbar          # R×E: P·K of those rows, the direction of dQ's residual (_remove_residual)
    double* psum          # R: rowsum(P) of those rows
    double* dssum         # R: rowsum(dS) of those rows (0 in exact arithmetic)
    double* d             # BQ: D = rowsum(dO ∘ O) of the query tile
    double* acc           # max(BK, E, Ev): the loops' row sums


cdef inline void _bwd_layout(BwdTile* t, floating* fbuf, double* dbuf, Py_ssize_t R, Py_ssize_t BQ,
                             Py_ssize_t BK, Py_ssize_t E, Py_ssize_t Ev) noexcept nogil:
    """Lay out the per-thread scratch (sizes: _bwd_fsize, _bwd_dsize) in t."""
    cdef Py_ssize_t wide = max(BK * max(E, Ev), BQ * E)
    t.s = fbuf
    t.dp = fbuf + BQ * BK
    t.prod = fbuf + 2 * BQ * BK
    t.kt = fbuf + 2 * BQ * BK + wide
    t.vt = fbuf + 2 * BQ * BK + wide + E * (BK + 32)
    t.dk = dbuf
    t.dv = dbuf + BK * E
    t.dq = dbuf + BK * (E + Ev)
    t.kbar = t.dq + R * E
    t.psum = t.kbar + R * E
    t.dssum = t.psum + R
    t.d = t.dssum + R
    t.acc = t.d + BQ


cdef inline Py_ssize_t _bwd_fsize(Py_ssize_t BQ, Py_ssize_t BK, Py_ssize_t E, Py_ssize_t Ev) noexcept nogil:
    return 2 * BQ * BK + max(BK * max(E, Ev), BQ * E) + (E + Ev) * (BK + 32)


cdef inline Py_ssize_t _bwd_dsize(Py_ssize_t R, Py_ssize_t BQ, Py_ssize_t BK, Py_ssize_t E,
                                  Py_ssize_t Ev) noexcept nogil:
    return BK * (E + Ev) + 2 * R * E + 2 * R + BQ + max(BK, max(E, Ev))


cdef inline void _add_into(double* acc, const floating* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + x[j]


cdef inline floating _rowsum_do_o(const floating* do_, const floating* o, Py_ssize_t Ev, int tiles) noexcept nogil:
    """D = Σ_c dO[c]·O[c] of one query row, summed the way the tile products sum dP = dO·Vᵀ, so that dP - D
    cancels where it should (a row that sees one key has O = V, and its dS is exactly 0): micro-kernel, by the
    micro-kernel itself (a 1×1 product); loops and BLAS, in double, rounded once."""
    cdef floating acc = 0
    cdef double dsum = 0
    cdef Py_ssize_t c
    if tiles == TILES_MICRO:
        _micro_gemm(1, 1, Ev, 1, do_, Ev, 1, o, 1, &acc, 1)
        return acc
    for c in range(Ev):
        dsum = dsum + <double>do_[c] * o[c]
    return <floating>dsum


cdef inline double _sum_wide(const floating* x, Py_ssize_t n) noexcept nogil:
    """Σ x[j] in double, LANES partial sums (so that it vectorises without reassociating), folded pairwise."""
    cdef double lanes[LANES]
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = n - n % LANES
    for u in range(LANES):
        lanes[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            lanes[u] = lanes[u] + <double>x[j * LANES + u]
    for j in range(nfull, n):
        lanes[0] = lanes[0] + <double>x[j]
    return _sum_lanes(lanes)


cdef void _backward_block(const BwdTile* t, Py_ssize_t qrow, const floating* q, const floating* do_,
                          const floating* d, const floating* lse, const floating* k, Py_ssize_t ldk, Py_ssize_t ldv,
                          Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t j0, Py_ssize_t nk,
                          Py_ssize_t E, Py_ssize_t Ev, floating scale, const Masks* mk, bint kv_side,
                          bint q_side, int tiles) noexcept nogil:
    """One tile of the backward: queries i0..i0+nq-1 (q, do_, d, lse: their rows; qrow: their first row in the
    q-side sums t.dq, t.kbar, t.psum, t.dssum) against keys j0..j0+nk-1 (k: their rows; t.kt, t.vt: Kᵀ, Vᵀ of the
    tile, rows ldk, ldv apart).

    P = exp(scale·q kᵀ + masks - lse) (0 in a row with lse = -inf); dP = dO·Vᵀ; dS = P ∘ (dP - D)·scale with
    D = rowsum(dO ∘ O) (d, see _rowsum_do_o); kv_side: dV += Pᵀ·dO, dK += dSᵀ·Q (t.dv, t.dk); q_side: dQ += dS·K,
    and for _remove_residual P·K, rowsum(P), rowsum(dS). Each product is one tile product in the dtype, added into
    the double sums.
    """
    cdef floating* s = <floating*>t.s
    cdef floating* dp = <floating*>t.dp
    cdef floating* prod = <floating*>t.prod
    cdef floating* srow
    cdef floating* dprow
    cdef floating m, dr
    cdef Py_ssize_t r, c
    # 1. P = exp(scores - lse), recomputed
    _gemm_ab(nq, nk, E, scale, q, E, 1, <floating*>t.kt, ldk, s, nk, t.acc, tiles)
    for r in range(nq):
        srow = s + r * nk
        m = lse[r]
        if m == -INFINITY:               # the row sees no key: no gradient
            for c in range(nk):
                srow[c] = 0
            continue
        if _row_needs_mask(i0 + r, j0, nk, mk):
            _mask_row(srow, nk, b, h, i0 + r, j0, mk)
        for c in range(nk):
            srow[c] = _exp_neg(srow[c] - m)
        if q_side:
            t.psum[qrow + r] += _sum_wide(srow, nk)
    # 2. dV += Pᵀ·dO (nk×Ev: Pᵀ read through its strides)
    if kv_side:
        _gemm_ab(nk, Ev, nq, 1, s, 1, nk, do_, Ev, prod, Ev, t.acc, tiles)
        _add_into(t.dv, prod, nk * Ev)
    # 3. dP = dO·Vᵀ, then dS = P ∘ (dP - D)·scale in place
    _gemm_ab(nq, nk, Ev, 1, do_, Ev, 1, <floating*>t.vt, ldv, dp, nk, t.acc, tiles)
    for r in range(nq):
        srow = s + r * nk
        dprow = dp + r * nk
        dr = d[r]
        for c in range(nk):
            dprow[c] = srow[c] * (dprow[c] - dr) * scale
        if q_side:
            t.dssum[qrow + r] += _sum_wide(dprow, nk)
    # 4. dK += dSᵀ·Q (nk×E) and dQ += dS·K (nq×E)
    if kv_side:
        _gemm_ab(nk, E, nq, 1, dp, 1, nk, q, E, prod, E, t.acc, tiles)
        _add_into(t.dk, prod, nk * E)
    if q_side:
        _gemm_ab(nq, E, nk, 1, dp, nk, 1, k, E, prod, E, t.acc, tiles)
        _add_into(t.dq + qrow * E, prod, nq * E)
        _gemm_ab(nq, E, nk, 1, s, nk, 1, k, E, prod, E, t.acc, tiles)
        _add_into(t.kbar + qrow * E, prod, nq * E)


cdef inline void _clear_q_sums(const BwdTile* t, Py_ssize_t n, Py_ssize_t E) noexcept nogil:
    """Zero the q-side sums of n query rows: dQ, P·K, rowsum(P), rowsum(dS)."""
    memset(t.dq, 0, n * E * sizeof(double))
    memset(t.kbar, 0, n * E * sizeof(double))
    memset(t.psum, 0, n * sizeof(double))
    memset(t.dssum, 0, n * sizeof(double))


cdef void _remove_residual(const BwdTile* t, Py_ssize_t n, Py_ssize_t E) noexcept nogil:
    """dQ -= (rowsum(dS) / rowsum(P)) · P·K for each of n query rows (see attention_backward). A row with no key
    (rowsum(P) = 0) or NaN is left as it is."""
    cdef Py_ssize_t i, e
    cdef double c
    for i in range(n):
        if t.psum[i] > 0:
            c = t.dssum[i] / t.psum[i]
            for e in range(E):
                t.dq[i * E + e] -= c * t.kbar[i * E + e]


cdef inline void _seeing_rows(Py_ssize_t j0, Py_ssize_t nk, Py_ssize_t L, const Masks* mk, Py_ssize_t* i_lo,
                              Py_ssize_t* i_hi) noexcept nogil:
    """The query rows [i_lo, i_hi) that can see a key of j0..j0+nk-1 (causal, window)."""
    i_lo[0], i_hi[0] = 0, L
    if mk.causal:
        i_lo[0] = max(0, min(L, j0 - mk.causal_offset))
    if mk.window > 0:
        i_hi[0] = max(i_lo[0], min(L, j0 + nk - 1 - mk.causal_offset + mk.window))


cdef inline void _store_sum(floating* dst, const double* acc, Py_ssize_t n, bint add) noexcept nogil:
    """dst = acc (add False) or dst + acc (add True: the next query head of a GQA group), rounded to the dtype."""
    cdef Py_ssize_t x
    if add:
        for x in range(n):
            dst[x] = <floating>(dst[x] + acc[x])
    else:
        for x in range(n):
            dst[x] = <floating>acc[x]


cdef void _backward_kv_head(floating* gq, floating* gk, floating* gv, const floating* do_, const floating* q,
                            const floating* k, const floating* v, const floating* d, const floating* lse,
                            Py_ssize_t b, Py_ssize_t kvh, Py_ssize_t group, Py_ssize_t L, Py_ssize_t S,
                            Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ, Py_ssize_t BK, floating scale,
                            const Masks* mk, floating* fbuf, double* dbuf, int tiles) noexcept nogil:
    """One pass: all gradients of key/value head (b, kvh): gk, gv (S×E, S×Ev) and gq of its `group` query heads.

    gq, do_, q: the group's heads (group×L×E etc., consecutive); d, lse: group×L; k, v: S×E, S×Ev.
    One thread owns the whole work item: no other writes these rows, and the sums run in a fixed order (query
    heads, then key tiles, then query tiles), whatever the thread count. A key tile sees only the query rows that
    can see one of its keys (causal / window); every key tile is written, zeros where no query sees it.
    fbuf, dbuf: the per-thread scratch (_bwd_fsize, _bwd_dsize with R = L).
    """
    cdef BwdTile t
    _bwd_layout(&t, fbuf, dbuf, L, BQ, BK, E, Ev)
    cdef Py_ssize_t hh, h, kt, j0, nk, i_lo, i_hi, i0, nq, ldk, ldv
    for hh in range(group):
        h = kvh * group + hh
        _clear_q_sums(&t, L, E)
        for kt in range((S + BK - 1) // BK):
            j0 = kt * BK
            nk = min(BK, S - j0)
            memset(t.dk, 0, nk * E * sizeof(double))
            memset(t.dv, 0, nk * Ev * sizeof(double))
            _seeing_rows(j0, nk, L, mk, &i_lo, &i_hi)
            if i_hi > i_lo:
                ldk = _pack_t(<floating*>t.kt, k + j0 * E, nk, E, E)
                ldv = _pack_t(<floating*>t.vt, v + j0 * Ev, nk, Ev, Ev)
                i0 = i_lo
                while i0 < i_hi:
                    nq = min(BQ, i_hi - i0)
                    _backward_block(&t, i0, q + (hh * L + i0) * E, do_ + (hh * L + i0) * Ev,
                                    d + hh * L + i0, lse + hh * L + i0, k + j0 * E, ldk, ldv, b, h, i0, nq,
                                    j0, nk, E, Ev, scale, mk, True, True, tiles)
                    i0 += BQ
            _store_sum(gk + j0 * E, t.dk, nk * E, hh > 0)
            _store_sum(gv + j0 * Ev, t.dv, nk * Ev, hh > 0)
        _remove_residual(&t, L, E)
        _store_sum(gq + hh * L * E, t.dq, L * E, False)


cdef void _backward_kv_tile(floating* gk, floating* gv, const floating* do_, const floating* q, const floating* k,
                            const floating* v, const floating* d, const floating* lse, Py_ssize_t b,
                            Py_ssize_t kvh, Py_ssize_t group, Py_ssize_t L, Py_ssize_t j0, Py_ssize_t nk,
                            Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ, Py_ssize_t BK, floating scale,
                            const Masks* mk, floating* fbuf, double* dbuf, int tiles) noexcept nogil:
    """Two passes, the first: gk, gv of keys j0..j0+nk-1 of key/value head (b, kvh) (k, v, gk, gv: from row j0),
    summed in double over the group's query heads and the query tiles, in that order."""
    cdef BwdTile t
    _bwd_layout(&t, fbuf, dbuf, BQ, BQ, BK, E, Ev)
    cdef Py_ssize_t hh, i_lo, i_hi, i0, nq, ldk, ldv
    memset(t.dk, 0, nk * E * sizeof(double))
    memset(t.dv, 0, nk * Ev * sizeof(double))
    _seeing_rows(j0, nk, L, mk, &i_lo, &i_hi)
    if i_hi > i_lo:
        ldk = _pack_t(<floating*>t.kt, k, nk, E, E)
        ldv = _pack_t(<floating*>t.vt, v, nk, Ev, Ev)
        for hh in range(group):
            i0 = i_lo
            while i0 < i_hi:
                nq = min(BQ, i_hi - i0)
                _backward_block(&t, 0, q + (hh * L + i0) * E, do_ + (hh * L + i0) * Ev, d + hh * L + i0,
                                lse + hh * L + i0, k, ldk, ldv, b, kvh * group + hh, i0, nq, j0, nk, E, Ev, scale,
                                mk, True, False, tiles)
                i0 += BQ
    _store_sum(gk, t.dk, nk * E, False)
    _store_sum(gv, t.dv, nk * Ev, False)


cdef void _backward_q_tile(floating* gq, const floating* do_, const floating* q, const floating* k,
                           const floating* v, const floating* d, const floating* lse, Py_ssize_t b, Py_ssize_t h,
                           Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t S, Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ,
                           Py_ssize_t BK, floating scale, const Masks* mk, floating* fbuf, double* dbuf,
                           int tiles) noexcept nogil:
    """Two passes, the second: gq of queries i0..i0+nq-1 of head (b, h) (gq, do_, q, d, lse: from row i0; k, v:
    its key/value head), summed in double over the key tiles they can see."""
    cdef BwdTile t
    _bwd_layout(&t, fbuf, dbuf, BQ, BQ, BK, E, Ev)
    cdef Py_ssize_t end = _visible_end(i0 + nq - 1, S, mk)
    cdef Py_ssize_t start = _visible_start(i0, end, mk)
    cdef Py_ssize_t j0, nk, ldk, ldv
    _clear_q_sums(&t, nq, E)
    j0 = start
    while j0 < end:
        nk = min(BK, end - j0)
        ldk = _pack_t(<floating*>t.kt, k + j0 * E, nk, E, E)
        ldv = _pack_t(<floating*>t.vt, v + j0 * Ev, nk, Ev, Ev)
        _backward_block(&t, 0, q, do_, d, lse, k + j0 * E, ldk, ldv, b, h, i0, nq, j0, nk, E, Ev, scale, mk,
                        False, True, tiles)
        j0 += BK
    _remove_residual(&t, nq, E)
    _store_sum(gq, t.dq, nq * E, False)


def attention_backward(floating[:, :, :, ::1] grad_q, floating[:, :, :, ::1] grad_k,
                       floating[:, :, :, ::1] grad_v, const floating[:, :, :, ::1] grad_out,
                       const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                       const floating[:, :, :, ::1] v, const floating[:, :, :, ::1] out,
                       const floating[:, :, ::1] lse, double scale, bint causal, Py_ssize_t causal_offset,
                       Py_ssize_t window, const floating[:, :, :, :] mask, bint has_mask,
                       const floating[:, :] key_bias, bint has_key_bias):
    """Gradients of sum(grad_out ∘ attention(q, k, v, ...)), flash-style: P recomputed from lse tile by tile,
    O(N) extra memory, no L×S array.

    dQ's residual: each row of dS sums to 0 in exact arithmetic, but the P recomputed here and D (from `out`)
    come from scores rounded in different ways (another backend or tile products: one ulp of a score of 2450 is
    2.4e-4 of its probability), and dQ = dS·K carries the row's residual rowsum(dS) times |K|. So dQ also sums
    P·K, rowsum(P) and rowsum(dS) in double, and at the end subtracts (rowsum(dS) / rowsum(P))·P·K: the same as
    using D' = rowsum(P ∘ dP) / rowsum(P), the D of the probabilities recomputed here (known only once a row has
    seen every key; kernels/numba/attention_backward.py explains it at length). dK and dV keep D.

    One pass when there are _BWD_ONE_PASS_ITEMS (batch, key/value head) pairs or more: a work item per pair owns
    grad_k, grad_v of that head and grad_q of its query heads. Else two passes: work items per key tile (grad_k,
    grad_v), then per query tile (grad_q). Either way each output has one writer and its sums run in a fixed
    order: bitwise the same for any thread count (no atomics, no shared sums).
    """
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2], Ev = v.shape[3]
    if B * Hkv == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef floating* gqp = &grad_q[0, 0, 0, 0]
    cdef floating* gkp = &grad_k[0, 0, 0, 0]
    cdef floating* gvp = &grad_v[0, 0, 0, 0]
    if L == 0 or S == 0:
        memset(gqp, 0, B * Hq * L * E * sizeof(floating))
        memset(gkp, 0, B * Hkv * S * E * sizeof(floating))
        memset(gvp, 0, B * Hkv * S * Ev * sizeof(floating))
        return
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * (2 * E + 2 * Ev), L, max(L, S, E, Ev), B * Hkv)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = _BWD_BQ, BK = _BWD_BK
    cdef bint one_pass = B * Hkv >= _BWD_ONE_PASS_ITEMS
    cdef Py_ssize_t R = L if one_pass else BQ
    cdef Py_ssize_t n_kt = (S + BK - 1) // BK, n_qt = (L + BQ - 1) // BQ
    cdef floating alpha_scale = <floating>scale
    cdef const floating* dop = &grad_out[0, 0, 0, 0]
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef const floating* vp = &v[0, 0, 0, 0]
    cdef const floating* op = &out[0, 0, 0, 0]
    cdef const floating* lp = &lse[0, 0, 0]
    cdef Py_ssize_t w, bx, b, kvh, h0, bh, j0, i0
    cdef floating* dp = <floating*>malloc(B * Hq * L * sizeof(floating))     # D = rowsum(dO ∘ O), per query row
    if dp == NULL:
        raise MemoryError("attention_backward: no memory for D")
    with nogil:
        for w in prange(B * Hq * L, schedule="static", num_threads=_n_threads):
            dp[w] = _rowsum_do_o(dop + w * Ev, op + w * Ev, Ev, tiles)
    cdef floating* fbuf = NULL
    cdef double* dbuf = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        fbuf = <floating*>malloc(_bwd_fsize(BQ, BK, E, Ev) * sizeof(floating) + 64)
        dbuf = <double*>malloc(_bwd_dsize(R, BQ, BK, E, Ev) * sizeof(double))
        if one_pass:
            for w in prange(B * Hkv, schedule="dynamic"):
                if fbuf == NULL or dbuf == NULL:
                    failed_flag[0] = 1
                    continue
                h0 = (w // Hkv) * Hq + (w % Hkv) * group     # the group's first query head
                _backward_kv_head(gqp + h0 * L * E, gkp + w * S * E, gvp + w * S * Ev, dop + h0 * L * Ev,
                                  qp + h0 * L * E, kp + w * S * E, vp + w * S * Ev, dp + h0 * L, lp + h0 * L,
                                  w // Hkv, w % Hkv, group, L, S, E, Ev, BQ, BK, alpha_scale, &mk, fbuf, dbuf,
                                  tiles)
        else:
            for w in prange(B * Hkv * n_kt, schedule="dynamic"):       # grad_k, grad_v: per key tile
                if fbuf == NULL or dbuf == NULL:
                    failed_flag[0] = 1
                    continue
                bx = w // n_kt
                j0 = (w % n_kt) * BK
                h0 = (bx // Hkv) * Hq + (bx % Hkv) * group
                _backward_kv_tile(gkp + (bx * S + j0) * E, gvp + (bx * S + j0) * Ev, dop + h0 * L * Ev,
                                  qp + h0 * L * E, kp + (bx * S + j0) * E, vp + (bx * S + j0) * Ev,
                                  dp + h0 * L, lp + h0 * L, bx // Hkv, bx % Hkv, group, L, j0, min(BK, S - j0),
                                  E, Ev, BQ, BK, alpha_scale, &mk, fbuf, dbuf, tiles)
            for w in prange(B * Hq * n_qt, schedule="dynamic"):        # grad_q: per query tile
                if fbuf == NULL or dbuf == NULL:
                    failed_flag[0] = 1
                    continue
                bh = w // n_qt
                i0 = (w % n_qt) * BQ
                bx = (bh // Hq) * Hkv + (bh % Hq) // group             # its key/value head
                _backward_q_tile(gqp + (bh * L + i0) * E, dop + (bh * L + i0) * Ev, qp + (bh * L + i0) * E,
                                 kp + bx * S * E, vp + bx * S * Ev, dp + bh * L + i0, lp + bh * L + i0,
                                 bh // Hq, bh % Hq, i0, min(BQ, L - i0), S, E, Ev, BQ, BK, alpha_scale, &mk,
                                 fbuf, dbuf, tiles)
        free(fbuf)
        free(dbuf)
    free(dp)
    if failed:
        raise MemoryError("attention_backward: no memory for the per-thread buffers")
