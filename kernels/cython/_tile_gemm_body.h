/* The tile product of _tile_gemm.h for one element type: included once per type, with FA_T (element), FA_V (vector
 * of FA_VEC_BYTES bytes) and FA_NAME(name) (name plus a type suffix) defined. No include guard, on purpose. */

/* c[0:mr, 0:nv*W] = alpha * a[0:mr, 0:K] @ b[0:K, 0:nv*W]. mr <= FA_MR and nv <= FA_NV are constants wherever this
 * is inlined: the loops over them unroll and acc[][] lives in registers. Unaligned loads and stores (memcpy of a
 * vector: one vmovups). */
FA_ALWAYS_INLINE void FA_NAME(fa_block)(const int mr, const int nv, ptrdiff_t K, FA_T alpha, const FA_T *a,
                                        ptrdiff_t a_rs, ptrdiff_t a_cs, const FA_T *b, ptrdiff_t ldb, FA_T *c,
                                        ptrdiff_t ldc)
{
    enum { W = FA_VEC_BYTES / sizeof(FA_T) };
    FA_V acc[FA_MR][FA_NV];
    FA_V bv[FA_NV];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            acc[r][v] = (FA_V){0};
    for (ptrdiff_t k = 0; k < K; k++) {
        for (int v = 0; v < nv; v++)
            memcpy(&bv[v], b + k * ldb + v * W, sizeof(FA_V));
        for (int r = 0; r < mr; r++) {
            const FA_T ar = a[r * a_rs + k * a_cs];
            for (int v = 0; v < nv; v++)
                acc[r][v] += ar * bv[v];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) {
            const FA_V out = acc[r][v] * alpha;
            memcpy(c + r * ldc + v * W, &out, sizeof(FA_V));
        }
}

/* The rows left over below the last full block of FA_MR rows (fewer than FA_MR): one block of that height. */
FA_ALWAYS_INLINE void FA_NAME(fa_block_rows)(const int rows, const int nv, ptrdiff_t K, FA_T alpha, const FA_T *a,
                                             ptrdiff_t a_rs, ptrdiff_t a_cs, const FA_T *b, ptrdiff_t ldb, FA_T *c,
                                             ptrdiff_t ldc)
{
    switch (rows) { /* FA_MR = 6 */
    case 5: FA_NAME(fa_block)(5, nv, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc); break;
    case 4: FA_NAME(fa_block)(4, nv, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc); break;
    case 3: FA_NAME(fa_block)(3, nv, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc); break;
    case 2: FA_NAME(fa_block)(2, nv, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc); break;
    case 1: FA_NAME(fa_block)(1, nv, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc); break;
    default: break;
    }
}

/* The last columns, fewer than a vector (0 < cols < W): the block of fa_block with one vector whose lanes past
 * cols are zero, loaded and stored element by element (never past column N of b or c). Every column of the product
 * thus gets the same vector FMAs, wherever it lies: a column's bits do not depend on N (a key's score does not
 * depend on how many keys follow it, which is what makes a padded sequence's attention equal its own). */
FA_ALWAYS_INLINE void FA_NAME(fa_block_tail)(const int mr, const int cols, ptrdiff_t K, FA_T alpha, const FA_T *a,
                                             ptrdiff_t a_rs, ptrdiff_t a_cs, const FA_T *b, ptrdiff_t ldb, FA_T *c,
                                             ptrdiff_t ldc)
{
    enum { W = FA_VEC_BYTES / sizeof(FA_T) };
    FA_V acc[FA_MR];
    union { FA_V v; FA_T x[W]; } bv, out;
    for (int r = 0; r < mr; r++)
        acc[r] = (FA_V){0};
    bv.v = (FA_V){0};
    for (ptrdiff_t k = 0; k < K; k++) {
        for (int t = 0; t < cols; t++)
            bv.x[t] = b[k * ldb + t];
        for (int r = 0; r < mr; r++)
            acc[r] += a[r * a_rs + k * a_cs] * bv.v;
    }
    for (int r = 0; r < mr; r++) {
        out.v = acc[r] * alpha;
        for (int t = 0; t < cols; t++)
            c[r * ldc + t] = out.x[t];
    }
}

/* c = alpha * (a @ b): c (M x N, row stride ldc), a (M x K, element strides a_rs, a_cs), b (K x N, row stride ldb).
 * Column blocks outside, row blocks inside: a K x (FA_NV*W) panel of b is reused by every row block from L1. */
static void FA_NAME(fa_tile_gemm)(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, FA_T alpha, const FA_T *a, ptrdiff_t a_rs,
                                  ptrdiff_t a_cs, const FA_T *b, ptrdiff_t ldb, FA_T *c, ptrdiff_t ldc)
{
    enum { W = FA_VEC_BYTES / sizeof(FA_T) };
    const ptrdiff_t m_main = M - M % FA_MR;
    const ptrdiff_t n_wide = N - N % (FA_NV * W);
    const ptrdiff_t n_vec = N - N % W;
    ptrdiff_t i0, j0;
    for (j0 = 0; j0 < n_wide; j0 += FA_NV * W) { /* blocks of FA_MR rows x FA_NV vectors */
        for (i0 = 0; i0 < m_main; i0 += FA_MR)
            FA_NAME(fa_block)(FA_MR, FA_NV, K, alpha, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, c + i0 * ldc + j0, ldc);
        FA_NAME(fa_block_rows)((int)(M - m_main), FA_NV, K, alpha, a + m_main * a_rs, a_rs, a_cs, b + j0, ldb,
                               c + m_main * ldc + j0, ldc);
    }
    for (j0 = n_wide; j0 < n_vec; j0 += W) { /* columns left over: one vector at a time */
        for (i0 = 0; i0 < m_main; i0 += FA_MR)
            FA_NAME(fa_block)(FA_MR, 1, K, alpha, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, c + i0 * ldc + j0, ldc);
        FA_NAME(fa_block_rows)((int)(M - m_main), 1, K, alpha, a + m_main * a_rs, a_rs, a_cs, b + j0, ldb,
                               c + m_main * ldc + j0, ldc);
    }
    if (n_vec < N) { /* the last columns, fewer than a vector: the same vector arithmetic, lanes past N zero */
        const int cols = (int)(N - n_vec);
        for (i0 = 0; i0 < m_main; i0 += FA_MR)
            FA_NAME(fa_block_tail)(FA_MR, cols, K, alpha, a + i0 * a_rs, a_rs, a_cs, b + n_vec, ldb,
                                   c + i0 * ldc + n_vec, ldc);
        for (i0 = m_main; i0 < M; i0++) /* rows below the last full block: one at a time */
            FA_NAME(fa_block_tail)(1, cols, K, alpha, a + i0 * a_rs, a_rs, a_cs, b + n_vec, ldb,
                                   c + i0 * ldc + n_vec, ldc);
    }
}
