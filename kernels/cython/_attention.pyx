# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# fastattn: isa-variants
"""Attention kernels: scores, softmax, weighted_sum (the stages) and attention (fused, flash-style), each with its
backward kernel beside it: softmax_backward, scores_backward, weighted_sum_backward, attention_backward.

Contract: kernels/README.md. Arrays are C-contiguous except `mask` (B, Hq, L, S) and `key_bias` (B, S), which
may be read-only broadcast views (zero strides): they are read through their strides, and never when
has_mask / has_key_bias is False.

Tile products. `_gemm_nt` (scores = Q·Kᵀ) and `_gemm_nn` (P·V) run one of three ways (TILES_*, chosen per
process: FASTATTN_CYTHON_TILES, _set_tile_products; tile_products() reports it):
  micro (default)  the register-blocked micro-kernel of _tile_gemm.h: C with vector extensions, 6×64 float32 blocks
                   in AVX-512 registers in the avx512 build (6×16 with AVX2, 6×8 with SSE2). Kᵀ is packed once per
                   key tile, with rows an odd number of cache lines apart. ~360 GFLOP/s on 2 AVX-512 cores at N=4096.
  blas             sgemm/dgemm taken from scipy.linalg.cython_blas at run time, single-threaded inside the OpenMP
                   region (see _blas.py); the loops serve calls too small for it (_BLAS_MIN_WORK) or when SciPy is
                   missing. Loading it sets SciPy's OpenBLAS to one thread for the whole process. ~195 GFLOP/s.
  loops            the plain loops of _gemm_nt / _gemm_nn, the readable reference. ~60 GFLOP/s.
All three give the same results up to rounding (the tests run each against the oracle).

Wide accumulation. float32 products stay float32 (micro-kernel and sgemm; in the loops, groups of 4 products summed
in float32), but every long sum is kept in double: softmax row sums (exp_shift_sum), the fused kernel's running row
sums and output rows (one float32 tile product per key tile, added into a double running weighted average, which
also keeps huge values in V from overflowing), and weighted_sum (float32 products on chunks of BK keys added up in
double). One heavy weight must not swallow many light ones. The backward kernels do the same: each tile product
in the dtype, added into double sums (dK, dV over query tiles, dQ over key tiles, the stage kernels' long sums in
chunks of BK terms).

Determinism. Every output has one writer (a work item) and its sums run in an order fixed by the shapes: results
are bitwise the same for any thread count, the backward kernels included (no atomics, no per-thread partial sums).
"""

from cython.parallel cimport parallel, prange
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport INFINITY, NAN, exp, fabs, fabsf, log
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

include "_common.pxi"

# The sources by role (each a .pxi included here, so that the ISA builds of setup.py compile them as one module):
include "_attention_tiles.pxi"    # tile products: micro-kernel, BLAS, loops; the plan of a call
include "_attention_masks.pxi"    # masks as structure: causal, additive mask, key bias
include "_attention_stages.pxi"   # stage kernels: scores, softmax, weighted_sum and their backward kernels
include "_attention_fused.pxi"    # fused kernels: attention (decoding split included), attention_backward
