# The fused, flash-style attention kernel (textually included by _attention.pyx): an online softmax over key
# tiles, one work item per (head, query tile), never an L×S array.

cdef Py_ssize_t _DIAG_ROWS = 64   # on the causal diagonal, query rows go in groups of this many


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
    # 1. scores: s[r, c] = scale·⟨q[r], k[j0 + c]⟩ + masks
    _gemm_nt(nq, nk, E, scale, q, E, k + j0 * E, E, s, nk, <floating*>t.bt, tiles)
    # 2. online softmax: s[r] becomes exp(s - ref); m, l and the two factors of step 3 follow
    for r in range(nq):
        srow = s + r * nk
        if mk.mask != NULL or mk.key_bias != NULL or (mk.causal and j0 + nk - 1 > i0 + r + mk.causal_offset):
            _mask_row(srow, nk, b, h, i0 + r, j0, mk)
        tile_max = row_max(srow, nk)
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
        l_new = l_old * alpha + exp_shift_sum(srow, nk, ref)
        l[r] = l_new
        m[r] = m_new
        if l_new != 0.0:                # (NaN included: the row stays NaN)
            keep[r] = l_old * alpha / l_new
            add[r] = up / l_new
        if up != 1.0:                   # huge V: p / up for the gemm (rare)
            for c in range(nk):
                srow[c] = srow[c] * down
    # 3. weighted sum of this tile folded into the running average (rows with l = 0 saw no key: acc stays 0)
    if tiles == TILES_LOOPS:
        _fold_pv_loops(acc, s, nq, nk, v + j0 * Ev, Ev, keep, add, l)
        return
    _gemm_nn(nq, Ev, nk, s, nk, v + j0 * Ev, Ev, pv, Ev, NULL, tiles)
    for r in range(nq):
        if l[r] != 0.0:
            kr = keep[r]
            ar = add[r]
            arow = acc + r * Ev
            pvrow = pv + r * Ev
            for c in range(Ev):
                arow[c] = arow[c] * kr + pvrow[c] * ar


cdef void _attend_query_tile(floating* o, const floating* q, const floating* k, const floating* v,
                             Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t S,
                             Py_ssize_t E, Py_ssize_t Ev, Py_ssize_t BQ, Py_ssize_t BK, floating scale,
                             double v_big, double up_big, const Masks* mk, floating* fbuf, double* dbuf,
                             floating* bt, int tiles) noexcept nogil:
    """o[0:nq] = softmax(scale·q kᵀ + masks) v for queries i0..i0+nq-1 of head (b, h), key tile by key tile.

    q: nq×E rows of this head; k: S×E, v: S×Ev of its key/value head; o: nq×Ev rows of out. The output rows are
    accumulated in double (Tile.acc) and written once at the end; until then o holds each key tile's P·V
    (micro-kernel, BLAS). Per-thread scratch (see Tile): fbuf (BQ·BK floating), dbuf (BQ·Ev + 4·BQ doubles), bt
    (micro-kernel and loops: E×(BK + 32) floating and BK doubles).
    Causal: key tiles past the last visible key are skipped; a tile that crosses the diagonal is split into
    groups of _DIAG_ROWS rows, each computing only the keys its last row sees.
    Huge values (micro-kernel, BLAS): a key tile whose max |V| exceeds v_big has its P scaled down by up_big
    (see _attend_block).
    """
    cdef Py_ssize_t end = _visible_end(i0 + nq - 1, S, mk)
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
    for jt in range((end + BK - 1) // BK):
        j0 = jt * BK
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


def attention(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
              const floating[:, :, :, ::1] v, double scale, bint causal, Py_ssize_t causal_offset,
              const floating[:, :, :, :] mask, bint has_mask, const floating[:, :] key_bias, bint has_key_bias):
    """out = softmax(scale·QKᵀ + masks) V per head, fused: O(N) extra memory, never an L×S array."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2], Ev = v.shape[3]
    if B * Hq * L * Ev == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)
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
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, bh, b, h, i0, nq
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
        for w in prange(n_bh * n_qt, schedule="dynamic"):
            if fbuf == NULL or dbuf == NULL or (bt == NULL and tiles != TILES_BLAS):
                failed_flag[0] = 1
                continue
            bh = w % n_bh
            b = bh // Hq
            h = bh % Hq
            i0 = (n_qt - 1 - w // n_bh) * BQ
            nq = min(BQ, L - i0)
            _attend_query_tile(op + (bh * L + i0) * Ev, qp + (bh * L + i0) * E,
                               kp + (b * Hkv + h // group) * S * E, vp + (b * Hkv + h // group) * S * Ev,
                               b, h, i0, nq, S, E, Ev, BQ, BK, alpha_scale, v_big, up_big, &mk,
                               fbuf, dbuf, bt, tiles)
        free(fbuf)
        free(dbuf)
        free(bt)
    if failed:
        raise MemoryError("attention: no memory for the per-thread tile buffers")
