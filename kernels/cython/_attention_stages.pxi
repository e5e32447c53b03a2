# The stage kernels (textually included by _attention.pyx): scores, softmax, weighted_sum, one parallel loop each,
# what the profiler times one by one; then their backward kernels (softmax_backward, scores_backward,
# weighted_sum_backward), which reuse the tile products with double sums.

def scores(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
           double scale, bint causal, Py_ssize_t causal_offset, Py_ssize_t window, const floating[:, :, :, :] mask,
           bint has_mask, const floating[:, :] key_bias, bint has_key_bias):
    """out[b, h, i, j] = scale·⟨q[b, h, i], k[b, h // g, j]⟩ (+ mask) (+ key_bias); causal / window hidden -> -inf."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2]
    if B * Hq * L * S == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * E, L, max(L, S, E), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ, BK = plan.BK
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ
    cdef floating alpha = <floating>scale
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, b, h, i0, nq, jt, j0, nk, r, c, start, end
    cdef floating* srow
    cdef floating* bt = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        if tiles != TILES_BLAS:
            bt = <floating*>malloc(E * (BK + 32) * sizeof(floating) + BK * sizeof(double) + 64)
        for w in prange(B * Hq * n_qt, schedule="dynamic"):
            if bt == NULL and tiles != TILES_BLAS:
                failed_flag[0] = 1
                continue
            b = w // (Hq * n_qt)
            h = (w // n_qt) % Hq
            i0 = (w % n_qt) * BQ
            nq = min(BQ, L - i0)
            end = _visible_end(i0 + nq - 1, S, &mk)
            start = _visible_start(i0, end, &mk)
            for jt in range((end - start + BK - 1) // BK):  # scale·QKᵀ on the key tiles that can be visible
                j0 = start + jt * BK
                nk = min(BK, end - j0)
                _gemm_nt(nq, nk, E, alpha, qp + ((b * Hq + h) * L + i0) * E, E,
                         kp + (b * Hkv + h // group) * S * E + j0 * E, E,
                         op + ((b * Hq + h) * L + i0) * S + j0, S, bt, tiles)
            for r in range(nq):                     # masks; the keys before `start` and from `end` on are hidden
                srow = op + ((b * Hq + h) * L + i0 + r) * S
                for c in range(start):
                    srow[c] = -INFINITY
                _mask_row(srow + start, end - start, b, h, i0 + r, start, &mk)
                for c in range(end, S):
                    srow[c] = -INFINITY
        free(bt)
    if failed:
        raise MemoryError("scores: no memory for the per-thread tile buffers")


def softmax(floating[:, ::1] out, const floating[:, ::1] s):
    """out[r] = exp(s[r] - max) / sum, row by row; a row of -inf gives zeros. out may be s itself."""
    cdef Py_ssize_t R = s.shape[0], S = s.shape[1], r, c
    if R * S == 0:
        return
    cdef floating* orow
    cdef const floating* srow
    cdef double mx, total
    cdef floating inv
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            orow = &out[r, 0]
            srow = &s[r, 0]
            if <const floating*>orow != srow:
                memcpy(orow, srow, S * sizeof(floating))
            mx = row_max(orow, S)
            total = exp_shift_sum(orow, S, mx if mx != -INFINITY else 0.0)  # NaN stays: exp(NaN) = NaN
            if total == 0:                   # every score -inf: no key to attend to
                memset(orow, 0, S * sizeof(floating))
            else:
                inv = <floating>(1.0 / total)
                for c in range(S):
                    orow[c] = orow[c] * inv


def weighted_sum(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] p, const floating[:, :, :, ::1] v):
    """out[b, h] = p[b, h] @ v[b, h // g] (L×S times S×Ev), each output summed in double.

    Loops: double sums. Micro-kernel or BLAS, float32: products on chunks of BK keys (the plan's), the chunks added
    up in double (a long float32 sum would let one heavy weight swallow many light ones); float64: one product per
    query tile.
    """
    cdef Py_ssize_t B = p.shape[0], Hq = p.shape[1], L = p.shape[2], S = p.shape[3]
    cdef Py_ssize_t Hkv = v.shape[1], Ev = v.shape[3]
    if B * Hq * L * Ev == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Plan plan = _plan(<double>B * Hq * L * S * Ev, L, max(L, S, Ev), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ
    cdef bint chunked = tiles != TILES_LOOPS and floating is float and S > plan.BK
    cdef Py_ssize_t chunk = plan.BK if chunked else max(S, 1)
    cdef const floating* pp = &p[0, 0, 0, 0]
    cdef const floating* vp = &v[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, b, h, i0, nq, jc, j0, nk, x
    cdef const floating* prow
    cdef const floating* vh
    cdef floating* orow
    cdef floating* tile = NULL
    cdef double* acc = NULL
    cdef int failed = 0
    cdef int* failed_flag = &failed             # shared: written through the pointer
    with nogil, parallel(num_threads=_n_threads):
        # per thread: loops, Ev doubles (row sums); chunked products, a float32 product tile and its double sum
        acc = <double*>malloc((BQ * Ev if chunked else Ev) * sizeof(double))
        tile = <floating*>malloc(BQ * Ev * sizeof(floating)) if chunked else NULL
        for w in prange(B * Hq * n_qt, schedule="dynamic"):
            if acc == NULL or (tile == NULL and chunked):
                failed_flag[0] = 1
                continue
            b = w // (Hq * n_qt)
            h = (w // n_qt) % Hq
            i0 = (w % n_qt) * BQ
            nq = min(BQ, L - i0)
            prow = pp + ((b * Hq + h) * L + i0) * S
            vh = vp + (b * Hkv + h // group) * S * Ev
            orow = op + ((b * Hq + h) * L + i0) * Ev
            if not chunked:
                _gemm_nn(nq, Ev, S, prow, S, vh, Ev, orow, Ev, acc, tiles)
                continue
            for x in range(nq * Ev):
                acc[x] = 0
            for jc in range((S + chunk - 1) // chunk):
                j0 = jc * chunk
                nk = min(chunk, S - j0)
                _gemm_nn(nq, Ev, nk, prow + j0, S, vh + j0 * Ev, Ev, tile, Ev, NULL, tiles)
                for x in range(nq * Ev):
                    acc[x] = acc[x] + tile[x]
            for x in range(nq * Ev):
                orow[x] = <floating>acc[x]
        free(acc)
        free(tile)
    if failed:
        raise MemoryError("weighted_sum: no memory for the per-thread buffers")


# ---------------------------------------------------------------------------------------------------------------
# Stage kernels of the backward pass
# ---------------------------------------------------------------------------------------------------------------

cdef void _sum_products(double* dacc, bint fresh, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                        const floating* a, Py_ssize_t a_rs, Py_ssize_t a_cs, const floating* b, Py_ssize_t ldb,
                        Py_ssize_t chunk, floating* tile, double* acc, int tiles) noexcept nogil:
    """dacc (m×n, dense) = (fresh) or += alpha·A·B (A through its strides, B row-major k×n), as tile products over
    chunks of `chunk` terms added up in double: a long float32 sum never runs in float32. tile: m×n floating;
    acc: n doubles (loops)."""
    cdef Py_ssize_t e0, ke, x
    if fresh:
        memset(dacc, 0, m * n * sizeof(double))
    e0 = 0
    while e0 < k:
        ke = min(chunk, k - e0)
        _gemm_ab(m, n, ke, alpha, a + e0 * a_cs, a_rs, a_cs, b + e0 * ldb, ldb, tile, n, acc, tiles)
        for x in range(m * n):
            dacc[x] = dacc[x] + tile[x]
        e0 += chunk


cdef int _grouped_products(floating* c, const floating* a, const floating* b, Py_ssize_t B, Py_ssize_t Hq,
                           Py_ssize_t Hkv, Py_ssize_t M, Py_ssize_t n, Py_ssize_t k, bint a_t, floating alpha,
                           Py_ssize_t BM, Py_ssize_t chunk, int tiles) except -1:
    """c[b, x] (M×n) = alpha·Σ over the query heads h of key/value head x, in order, of op(a[b, h]) @ b[b, h].

    a[b, h]: M×k (a_t False) or k×M read transposed (a_t True); b[b, h]: k×n; c: (B, Hkv, M, n). With Hq == Hkv
    this is one product per head. Work items: (b, x, tile of BM rows of c), each summed in double, in a fixed
    order: the same for any thread count.
    """
    cdef Py_ssize_t group = Hq // Hkv, n_t = (M + BM - 1) // BM
    cdef Py_ssize_t a_rs = 1 if a_t else k, a_cs = M if a_t else 1
    cdef Py_ssize_t w, bx, r0, nr, hh, x
    cdef const floating* ah
    cdef floating* tile = NULL
    cdef double* dacc = NULL
    cdef double* acc = NULL
    cdef floating* crow
    cdef int failed = 0
    cdef int* failed_flag = &failed
    with nogil, parallel(num_threads=_n_threads):
        tile = <floating*>malloc(BM * n * sizeof(floating) + 64)
        dacc = <double*>malloc((BM * n + n + 1) * sizeof(double))
        acc = dacc + BM * n if dacc != NULL else NULL
        for w in prange(B * Hkv * n_t, schedule="dynamic"):
            if tile == NULL or dacc == NULL:
                failed_flag[0] = 1
                continue
            bx = w // n_t
            r0 = (w % n_t) * BM
            nr = min(BM, M - r0)
            for hh in range(group):
                ah = a + (bx * group + hh) * M * k + (r0 if a_t else r0 * k)
                _sum_products(dacc, hh == 0, nr, n, k, alpha, ah, a_rs, a_cs, b + (bx * group + hh) * k * n, n,
                              chunk, tile, acc, tiles)
            crow = c + (bx * M + r0) * n
            for x in range(nr * n):
                crow[x] = <floating>dacc[x]
        free(tile)
        free(dacc)
    if failed:
        raise MemoryError("no memory for the per-thread buffers")
    return 0


cdef inline double _dot_wide(const floating* x, const floating* y, Py_ssize_t n) noexcept nogil:
    """Σ x[j]·y[j] in double, LANES partial sums (so that it vectorises), folded pairwise."""
    cdef double lanes[LANES]
    cdef Py_ssize_t j, u
    cdef Py_ssize_t nfull = n - n % LANES
    for u in range(LANES):
        lanes[u] = 0
    for j in range(0, nfull // LANES):
        for u in range(LANES):
            lanes[u] = lanes[u] + <double>x[j * LANES + u] * y[j * LANES + u]
    for j in range(nfull, n):
        lanes[0] = lanes[0] + <double>x[j] * y[j]
    return _sum_lanes(lanes)


def softmax_backward(floating[:, ::1] grad_s, const floating[:, ::1] grad_p, const floating[:, ::1] p):
    """grad_s[r] = p[r] ∘ (grad_p[r] - ⟨grad_p[r], p[r]⟩), row by row (the dot product in double)."""
    cdef Py_ssize_t R = p.shape[0], S = p.shape[1], r, c
    if R * S == 0:
        return
    cdef floating* grow
    cdef const floating* gprow
    cdef const floating* prow
    cdef floating dot
    with nogil:
        for r in prange(R, schedule="static", num_threads=_n_threads):
            grow = &grad_s[r, 0]
            gprow = &grad_p[r, 0]
            prow = &p[r, 0]
            dot = <floating>_dot_wide(gprow, prow, S)
            for c in range(S):
                grow[c] = prow[c] * (gprow[c] - dot)


def scores_backward(floating[:, :, :, ::1] grad_q, floating[:, :, :, ::1] grad_k,
                    const floating[:, :, :, ::1] grad_s, const floating[:, :, :, ::1] q,
                    const floating[:, :, :, ::1] k, double scale):
    """grad_q[b, h] = scale·grad_s[b, h] @ k[b, h // g]; grad_k[b, x] = scale·Σ over its query heads of
    grad_s[b, h]ᵀ @ q[b, h] (grad_s: 0 at masked positions). Long sums in double (chunks of tile products)."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2]
    if B * Hq * L * E > 0 and S == 0:
        memset(&grad_q[0, 0, 0, 0], 0, B * Hq * L * E * sizeof(floating))
    if B * Hkv * S * E > 0 and L == 0:
        memset(&grad_k[0, 0, 0, 0], 0, B * Hkv * S * E * sizeof(floating))
    if B * Hq * L * S * E == 0:
        return
    cdef Plan plan = _plan(<double>B * Hq * L * S * E, L, max(L, S, E), B * Hq)
    cdef floating alpha = <floating>scale
    cdef const floating* gsp = &grad_s[0, 0, 0, 0]
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef floating* gqp = &grad_q[0, 0, 0, 0]
    cdef floating* gkp = &grad_k[0, 0, 0, 0]
    _q_side_products(gqp, gsp, kp, B, Hq, Hkv, L, E, S, alpha, plan.BQ, plan.BK, plan.tiles)
    _grouped_products(gkp, gsp, qp, B, Hq, Hkv, S, E, L, True, alpha, plan.BQ, plan.BK, plan.tiles)


cdef int _q_side_products(floating* c, const floating* a, const floating* b, Py_ssize_t B, Py_ssize_t Hq,
                          Py_ssize_t Hkv, Py_ssize_t M, Py_ssize_t n, Py_ssize_t k, floating alpha, Py_ssize_t BM,
                          Py_ssize_t chunk, int tiles) except -1:
    """c[b, h] (M×n) = alpha·a[b, h] (M×k) @ b[b, h // g] (k×n): each query head against its key/value head's
    rows, never copied. Work items (b, h, tile of BM rows), sums in double."""
    cdef Py_ssize_t group = Hq // Hkv, n_t = (M + BM - 1) // BM
    cdef Py_ssize_t w, bh, r0, nr, x
    cdef floating* tile = NULL
    cdef double* dacc = NULL
    cdef double* acc = NULL
    cdef floating* crow
    cdef int failed = 0
    cdef int* failed_flag = &failed
    with nogil, parallel(num_threads=_n_threads):
        tile = <floating*>malloc(BM * n * sizeof(floating) + 64)
        dacc = <double*>malloc((BM * n + n + 1) * sizeof(double))
        acc = dacc + BM * n if dacc != NULL else NULL
        for w in prange(B * Hq * n_t, schedule="dynamic"):
            if tile == NULL or dacc == NULL:
                failed_flag[0] = 1
                continue
            bh = w // n_t
            r0 = (w % n_t) * BM
            nr = min(BM, M - r0)
            _sum_products(dacc, True, nr, n, k, alpha, a + (bh * M + r0) * k, k, 1,
                          b + ((bh // Hq) * Hkv + (bh % Hq) // group) * k * n, n, chunk, tile, acc, tiles)
            crow = c + (bh * M + r0) * n
            for x in range(nr * n):
                crow[x] = <floating>dacc[x]
        free(tile)
        free(dacc)
    if failed:
        raise MemoryError("no memory for the per-thread buffers")
    return 0


def weighted_sum_backward(floating[:, :, :, ::1] grad_p, floating[:, :, :, ::1] grad_v,
                          const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] p,
                          const floating[:, :, :, ::1] v):
    """grad_p[b, h] = grad_out[b, h] @ v[b, h // g]ᵀ; grad_v[b, x] = Σ over its query heads of p[b, h]ᵀ @
    grad_out[b, h] (in double, chunks of tile products)."""
    cdef Py_ssize_t B = p.shape[0], Hq = p.shape[1], L = p.shape[2], S = p.shape[3]
    cdef Py_ssize_t Hkv = v.shape[1], Ev = v.shape[3]
    if B * Hkv * S * Ev > 0 and L == 0:
        memset(&grad_v[0, 0, 0, 0], 0, B * Hkv * S * Ev * sizeof(floating))
    if B * Hq * L * S == 0:
        return
    # grad_p = grad_out·vᵀ: the scores kernel's product (no masks), Ev terms per entry
    cdef floating[:, :, :, :] no_mask = grad_p
    cdef floating[:, :] no_bias = grad_p[0, 0]
    scores(grad_p, grad_out, v, 1.0, False, 0, 0, no_mask, False, no_bias, False)
    if Ev == 0:
        return
    cdef Plan plan = _plan(<double>B * Hq * L * S * Ev, L, max(L, S, Ev), B * Hq)
    _grouped_products(&grad_v[0, 0, 0, 0], &p[0, 0, 0, 0], &grad_out[0, 0, 0, 0], B, Hq, Hkv, S, Ev, L, True,
                      1, plan.BQ, plan.BK, plan.tiles)
