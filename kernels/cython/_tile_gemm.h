/* Register-blocked tile products for the Cython attention kernels: c = alpha * (a @ b) on tiles that sit in cache.
 *
 * The C twin of kernels/numba/_gemm.py. A product is cut into blocks of FA_MR rows x FA_NV SIMD vectors of
 * columns; each block keeps its FA_MR x FA_NV accumulators in vector registers for the whole inner (k) loop:
 *
 *     for k in 0..K-1:                        one step = FA_NV vector loads of b, FA_MR broadcasts of a,
 *         bv[v]      = b[k, j0 + v*W ...]     FA_MR * FA_NV fused multiply-adds
 *         acc[r][v] += a[i0 + r, k] * bv[v]
 *
 * The vectors are GCC/Clang vector extensions, so one source serves every build: the width follows the flags the
 * file is compiled with (64 bytes in the avx512 variant, 32 in the avx2 one, 16 = SSE2 in the baseline), and the
 * block shape follows the register file (32 zmm: 6 x 4 vectors = 6 x 64 floats; 16 ymm/xmm: 6 x 2). With -mfma the
 * compiler turns `acc + x * y` into one FMA (GCC and Clang contract within an expression by default in C; setup.py
 * also passes -ffp-contract=fast). Compilers without vector extensions (MSVC) get plain loops with the same result
 * up to rounding.
 *
 * Operands: a (M x K) with any element strides (read one element at a time and broadcast), b (K x N) with unit
 * column stride and row stride ldb, c (M x N) with unit column stride and row stride ldc. c is overwritten.
 * The block shape is a compile-time constant at each call site (the blocks are always inlined), so that the
 * accumulators become registers; the ragged edges (rows left over: a switch over 1..FA_MR-1; columns left over:
 * one vector wide, then fewer than a vector in plain C) use the same code with smaller constants.
 */
#ifndef FASTATTN_TILE_GEMM_H
#define FASTATTN_TILE_GEMM_H

#include <stddef.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && !defined(FA_TILE_GEMM_PLAIN) /* FA_TILE_GEMM_PLAIN: for tests */

#define FA_TILE_GEMM_VECTORS 1
#if defined(__AVX512F__)
#define FA_VEC_BYTES 64
#define FA_NV 4 /* 6 x 4 accumulators + 4 loaded vectors: 28 of the 32 zmm registers */
#elif defined(__AVX__)
#define FA_VEC_BYTES 32
#define FA_NV 2 /* 6 x 2 + 2: 14 of the 16 ymm registers (the classic 6 x 16 sgemm block) */
#else
#define FA_VEC_BYTES 16
#define FA_NV 2 /* SSE2: 14 of the 16 xmm registers */
#endif
#define FA_MR 6
#define FA_ALWAYS_INLINE static inline __attribute__((always_inline))

typedef float fa_vec_f __attribute__((vector_size(FA_VEC_BYTES)));
typedef double fa_vec_d __attribute__((vector_size(FA_VEC_BYTES)));

/* The same code for float and double: _tile_gemm_body.h is a template over FA_T (element), FA_V (vector) and
 * FA_NAME (suffix of the function names). */
#define FA_T float
#define FA_V fa_vec_f
#define FA_NAME(name) name##_f
#include "_tile_gemm_body.h"
#undef FA_T
#undef FA_V
#undef FA_NAME

#define FA_T double
#define FA_V fa_vec_d
#define FA_NAME(name) name##_d
#include "_tile_gemm_body.h"
#undef FA_T
#undef FA_V
#undef FA_NAME

#else /* no vector extensions (or FA_TILE_GEMM_PLAIN): plain loops */

#define FA_TILE_GEMM_VECTORS 0
#define FA_VEC_BYTES 0
#define FA_MR 1
#define FA_NV 1

#define FA_PLAIN_GEMM(T, NAME)                                                                                   \
    static void NAME(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, T alpha, const T *a, ptrdiff_t a_rs, ptrdiff_t a_cs, \
                     const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc)                                             \
    {                                                                                                            \
        for (ptrdiff_t i = 0; i < M; i++)                                                                        \
            for (ptrdiff_t j = 0; j < N; j++) {                                                                  \
                T s = 0;                                                                                         \
                for (ptrdiff_t k = 0; k < K; k++)                                                                \
                    s += a[i * a_rs + k * a_cs] * b[k * ldb + j];                                                \
                c[i * ldc + j] = alpha * s;                                                                      \
            }                                                                                                    \
    }
FA_PLAIN_GEMM(float, fa_tile_gemm_f)
FA_PLAIN_GEMM(double, fa_tile_gemm_d)
#undef FA_PLAIN_GEMM

#endif

#endif /* FASTATTN_TILE_GEMM_H */
