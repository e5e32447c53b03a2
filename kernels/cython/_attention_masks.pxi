# Masks as structure (textually included by _attention.pyx): causal flag and offset, the optional additive mask
# and key bias read through their strides; shared by the stage kernels and the fused kernel.

cdef struct Masks:
    bint causal
    Py_ssize_t causal_offset
    Py_ssize_t window          # 0: none; W > 0 (with causal): key j visible to query i iff i + off - W < j <= i + off
    const char* mask           # NULL when has_mask is False; else &mask[0, 0, 0, 0], strides in bytes below
    Py_ssize_t ms0, ms1, ms2, ms3
    const char* key_bias       # NULL when has_key_bias is False
    Py_ssize_t ks0, ks1


cdef inline void _mask_row(floating* srow, Py_ssize_t n, Py_ssize_t b, Py_ssize_t h, Py_ssize_t i,
                           Py_ssize_t j0, const Masks* mk) noexcept nogil:
    """s[i, j0 + c] += mask[b, h, i, j0 + c] + key_bias[b, j0 + c] (those present); causal / window hidden -> -inf."""
    cdef Py_ssize_t c, first_hidden, first_visible
    cdef const char* mrow
    cdef const char* krow
    if mk.mask != NULL:
        mrow = mk.mask + b * mk.ms0 + h * mk.ms1 + i * mk.ms2 + j0 * mk.ms3
        for c in range(n):
            srow[c] = srow[c] + (<const floating*>(mrow + c * mk.ms3))[0]
    if mk.key_bias != NULL:
        krow = mk.key_bias + b * mk.ks0 + j0 * mk.ks1
        for c in range(n):
            srow[c] = srow[c] + (<const floating*>(krow + c * mk.ks1))[0]
    if mk.causal:
        first_hidden = i + mk.causal_offset + 1 - j0     # key j is visible iff j <= i + causal_offset
        if first_hidden < 0:
            first_hidden = 0
        for c in range(first_hidden, n):
            srow[c] = -INFINITY
    if mk.window > 0:
        first_visible = i + mk.causal_offset - mk.window + 1 - j0   # key j is visible iff j > i + off - W
        if first_visible > n:
            first_visible = n
        for c in range(first_visible):
            srow[c] = -INFINITY


cdef inline bint _row_needs_mask(Py_ssize_t i, Py_ssize_t j0, Py_ssize_t nk, const Masks* mk) noexcept nogil:
    """Whether keys j0..j0+nk-1 of query i need _mask_row: a mask or key bias, or some key hidden by causal / window."""
    return (mk.mask != NULL or mk.key_bias != NULL or (mk.causal and j0 + nk - 1 > i + mk.causal_offset)
            or (mk.window > 0 and j0 <= i + mk.causal_offset - mk.window))


cdef inline Py_ssize_t _visible_start(Py_ssize_t i_first, Py_ssize_t end, const Masks* mk) noexcept nogil:
    """Keys before this one are hidden from queries from i_first on (0 without a window); at most end."""
    cdef Py_ssize_t start = 0
    if mk.window > 0:
        start = i_first + mk.causal_offset - mk.window + 1
        start = 0 if start < 0 else (end if start > end else start)
    return start


cdef inline Py_ssize_t _visible_end(Py_ssize_t i_last, Py_ssize_t S, const Masks* mk) noexcept nogil:
    """Keys [0, end) can be visible to queries up to i_last (all S unless causal)."""
    cdef Py_ssize_t end = S
    if mk.causal:
        end = i_last + mk.causal_offset + 1
        end = 0 if end < 0 else (S if end > S else end)
    return end


cdef int _masks_from(Masks* mk, bint causal, Py_ssize_t causal_offset, Py_ssize_t window,
                     const floating[:, :, :, :] mask, bint has_mask, const floating[:, :] key_bias,
                     bint has_key_bias) except -1:
    mk.causal = causal
    mk.causal_offset = causal_offset
    mk.window = window if causal and window > 0 else 0
    mk.mask = NULL
    mk.key_bias = NULL
    if has_mask:
        mk.mask = <const char*>&mask[0, 0, 0, 0]
        mk.ms0, mk.ms1, mk.ms2, mk.ms3 = mask.strides[0], mask.strides[1], mask.strides[2], mask.strides[3]
    if has_key_bias:
        mk.key_bias = <const char*>&key_bias[0, 0]
        mk.ks0, mk.ks1 = key_bias.strides[0], key_bias.strides[1]
    return 0
