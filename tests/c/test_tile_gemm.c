/* The micro-kernel of kernels/cython/_tile_gemm.h on its own, against a double-precision reference: every shape
 * M, N, K from 0 to past two blocks (all the ragged edges), a with row-major, column-major and padded strides, b and
 * c with padded rows, alpha != 1; float and double. Prints "ok <cases>" or the first failure and exits 1.
 * Built and run by tests/test_build.py once per instruction set the CPU runs, and once with -DFA_TILE_GEMM_PLAIN. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "_tile_gemm.h"

static double uniform(unsigned *state) /* a small LCG: the same numbers on every platform */
{
    *state = *state * 1664525u + 1013904223u;
    return (double)(*state >> 8) / (double)(1u << 24) * 2.0 - 1.0;
}

#define CHECK_TYPE(T, GEMM, EPS)                                                                                     \
    static int check_##T(int M, int N, int K, int layout, unsigned *state)                                          \
    {                                                                                                              \
        const ptrdiff_t pad = 3, lda_r = K + pad, lda_c = M + pad, ldb = N + pad, ldc = N + 5;                     \
        const ptrdiff_t a_rs = layout == 0 ? lda_r : 1, a_cs = layout == 0 ? 1 : lda_c;                           \
        const ptrdiff_t a_size = (layout == 0 ? M * lda_r : K * lda_c) + 1;                                       \
        T *a = malloc(sizeof(T) * a_size), *b = malloc(sizeof(T) * (K * ldb + 1));                                 \
        T *c = malloc(sizeof(T) * (M * ldc + 1));                                                                  \
        const T alpha = (T)0.75;                                                                                   \
        int bad = 0;                                                                                               \
        for (ptrdiff_t i = 0; i < a_size; i++) a[i] = (T)uniform(state);                                           \
        for (ptrdiff_t i = 0; i < K * ldb + 1; i++) b[i] = (T)uniform(state);                                     \
        for (ptrdiff_t i = 0; i < M * ldc + 1; i++) c[i] = (T)1e30; /* the padding must stay untouched */          \
        GEMM(M, N, K, alpha, a, a_rs, a_cs, b, ldb, c, ldc);                                                       \
        for (int i = 0; i < M && !bad; i++)                                                                        \
            for (int j = 0; j < ldc && !bad; j++) {                                                                \
                double ref = 0, mag = 0;                                                                           \
                if (j >= N) {                                                                                      \
                    bad = (i * ldc + j < M * ldc) && c[i * ldc + j] != (T)1e30;                                    \
                    continue;                                                                                      \
                }                                                                                                  \
                for (int k = 0; k < K; k++) {                                                                      \
                    double p = (double)a[i * a_rs + k * a_cs] * (double)b[k * ldb + j];                            \
                    ref += p;                                                                                      \
                    mag += fabs(p);                                                                                \
                }                                                                                                  \
                ref *= alpha;                                                                                      \
                bad = fabs((double)c[i * ldc + j] - ref) > 2.0 * (K + 2) * EPS * (mag + 1e-300);                   \
                if (bad)                                                                                           \
                    printf("FAIL " #T " M=%d N=%d K=%d layout=%d at (%d, %d): %.9g, expected %.9g\n", M, N, K,      \
                           layout, i, j, (double)c[i * ldc + j], ref);                                             \
            }                                                                                                      \
        free(a);                                                                                                   \
        free(b);                                                                                                   \
        free(c);                                                                                                   \
        return !bad;                                                                                               \
    }

CHECK_TYPE(float, fa_tile_gemm_f, 6e-8)
CHECK_TYPE(double, fa_tile_gemm_d, 1.2e-16)

int main(void)
{
    static const int sizes[] = {0, 1, 2, 5, 6, 7, 11, 12, 13, 15, 16, 17, 31, 33, 63, 64, 65, 129};
    const int n_sizes = sizeof(sizes) / sizeof(sizes[0]);
    unsigned state = 12345u;
    long cases = 0;
    for (int mi = 0; mi < n_sizes; mi++)
        for (int ni = 0; ni < n_sizes; ni++)
            for (int ki = 0; ki < n_sizes; ki += 3)
                for (int layout = 0; layout < 2; layout++) {
                    const int M = sizes[mi], N = sizes[ni], K = sizes[ki];
                    if (!check_float(M, N, K, layout, &state) || !check_double(M, N, K, layout, &state))
                        return 1;
                    cases += 2;
                }
    printf("ok %ld vectors=%d bytes=%d\n", cases, FA_TILE_GEMM_VECTORS, FA_VEC_BYTES);
    return 0;
}
