# The stage kernels (textually included by _attention.pyx): scores, softmax, weighted_sum, one parallel loop each,
# what the profiler times one by one.

def scores(floating[:, :, :, ::1] out, const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
           double scale, bint causal, Py_ssize_t causal_offset, const floating[:, :, :, :] mask, bint has_mask,
           const floating[:, :] key_bias, bint has_key_bias):
    """out[b, h, i, j] = scale·⟨q[b, h, i], k[b, h // g, j]⟩ (+ mask) (+ key_bias); causal hidden -> -inf."""
    cdef Py_ssize_t B = q.shape[0], Hq = q.shape[1], L = q.shape[2], E = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], S = k.shape[2]
    if B * Hq * L * S == 0:
        return
    cdef Py_ssize_t group = Hq // Hkv
    cdef Masks mk
    _masks_from(&mk, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)
    cdef Plan plan = _plan(<double>B * Hq * L * S * E, L, max(L, S, E), B * Hq)
    cdef int tiles = plan.tiles
    cdef Py_ssize_t BQ = plan.BQ, BK = plan.BK
    cdef Py_ssize_t n_qt = (L + BQ - 1) // BQ
    cdef floating alpha = <floating>scale
    cdef const floating* qp = &q[0, 0, 0, 0]
    cdef const floating* kp = &k[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t w, b, h, i0, nq, jt, j0, nk, r, c, end
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
            for jt in range((end + BK - 1) // BK):  # scale·QKᵀ on the key tiles that can be visible
                j0 = jt * BK
                nk = min(BK, end - j0)
                _gemm_nt(nq, nk, E, alpha, qp + ((b * Hq + h) * L + i0) * E, E,
                         kp + (b * Hkv + h // group) * S * E + j0 * E, E,
                         op + ((b * Hq + h) * L + i0) * S + j0, S, bt, tiles)
            for r in range(nq):                     # masks; the keys past `end` are hidden
                srow = op + ((b * Hq + h) * L + i0 + r) * S
                _mask_row(srow, end, b, h, i0 + r, 0, &mk)
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
