"""A small register-blocked tile product for the fused attention: ``c (+)= a @ b`` on tiles that sit in cache.

Why not BLAS: Numba's ``np.dot`` calls SciPy's OpenBLAS, one call per tile. That works (``attention_blas``), but on
this project's reference machine OpenBLAS runs its AVX2 ("Haswell") kernel, about 100 GFLOP/s a core, and each
call packs both operands again. Here a product is cut into blocks of ``MR`` rows x ``NV`` SIMD vectors of columns;
each block keeps its ``MR x NV`` accumulators in vector registers for the whole inner (k) loop:

    for k in range(K):                         one step = NV vector loads of b, MR broadcasts of a, MR*NV FMAs
        bv[v]   = b[k, j0 + v*W : j0 + (v+1)*W]          (W = 64 bytes / itemsize: 16 floats, 8 doubles)
        acc[r][v] += a[i0 + r, k] * bv[v]

Numba has no vector type, so that block ("micro-kernel") is written as an ``@intrinsic``: a few lines of LLVM IR
(vector loads, broadcasts, ``llvm.fmuladd``), which LLVM keeps in AVX-512 (or AVX2) registers. Everything around it
(the loops over blocks, the ragged edges) is plain Numba. ``a`` may have any strides (it is read one element at a
time and broadcast); ``b`` and ``c`` need unit column stride (rows contiguous).
"""

from __future__ import annotations

from numba import njit, types
from numba.core import cgutils
from numba.core import config as _numba_config
from numba.extending import intrinsic

from ._config import HELPER


def _block_shape():
    """(MR, NV, VEC_BYTES) for the CPU Numba compiles for: the accumulators plus the loaded vectors must fit the
    vector registers (32 zmm with AVX-512, 16 ymm with AVX2), or LLVM spills them to memory."""
    try:
        import llvmlite.binding as llvm

        if _numba_config.CPU_NAME is None and llvm.get_host_cpu_features().get("avx512f", False):
            return 6, 4, 64  # 6 x 4 = 24 accumulators + 4 loaded vectors in 32 zmm registers
    except Exception:
        pass
    return 6, 2, 32  # 12 accumulators + 2 loaded vectors in 16 ymm registers (the classic AVX2 6x16 sgemm block)


MR, NV, VEC_BYTES = _block_shape()  # rows per block, SIMD vectors of columns per block, bytes per SIMD vector


def _make_block_kernel(mr, nv):
    """An intrinsic ``kernel(c, a, b, i0, j0, accumulate)``: c[i0:i0+mr, j0:j0+nv*W] (+)= a[i0:i0+mr] @ b[:, j0:...]."""

    if _numba_config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same block in NumPy

        def kernel_py(c, a, b, i0, j0, accumulate):
            w = VEC_BYTES // c.itemsize
            rows, cols = slice(i0, i0 + mr), slice(j0, j0 + nv * w)
            block = a[rows, :] @ b[:, cols]
            c[rows, cols] = c[rows, cols] + block if accumulate else block

        return kernel_py

    @intrinsic
    def kernel(typingctx, c, a, b, i0, j0, accumulate):
        arrays = (c, a, b)
        if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
            return None
        if not (c.dtype == a.dtype == b.dtype and isinstance(c.dtype, types.Float)):
            return None
        sig = types.void(c, a, b, types.intp, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            c_ty, a_ty, b_ty = signature.args[:3]
            c_arr, a_arr, b_arr = (
                context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3], strict=True)
            )
            i0v, j0v, accv = args[3], args[4], args[5]
            el = context.get_data_type(c_ty.dtype)
            itemsize = context.get_abi_sizeof(el)
            w = VEC_BYTES // itemsize
            vec = ir.VectorType(el, w)
            intp = context.get_value_type(types.intp)

            def elem_strides(arr):
                byte_strides = cgutils.unpack_tuple(builder, arr.strides, 2)
                return [builder.sdiv(s, ir.Constant(intp, itemsize)) for s in byte_strides]

            a_rs, a_cs = elem_strides(a_arr)
            b_rs, _ = elem_strides(b_arr)
            c_rs, _ = elem_strides(c_arr)
            K = cgutils.unpack_tuple(builder, a_arr.shape, 2)[1]

            def ptr(arr, offset):
                return builder.gep(arr.data, [offset], source_etype=el)

            def vload(p):
                return builder.load(builder.bitcast(p, vec.as_pointer()), align=itemsize, typ=vec)

            def vstore(v, p):
                builder.store(v, builder.bitcast(p, vec.as_pointer()), align=itemsize)

            def splat(x):
                one = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
                zeros = ir.Constant(ir.VectorType(ir.IntType(32), w), [0] * w)
                return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), zeros)

            # fmuladd: one FMA instruction where the CPU has one, a multiply and an add where it does not
            fma_name = f"llvm.fmuladd.v{w}f{8 * itemsize}"  # llvm.fmuladd.v16f32 / llvm.fmuladd.v8f64
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), fma_name)
            zero = ir.Constant(vec, [0.0] * w)

            # accumulators: start from c (accumulate) or 0
            c_ptrs, accs = [], []
            for r in range(mr):
                row_off = builder.mul(builder.add(i0v, ir.Constant(intp, r)), c_rs)
                c_ptrs.append([])
                accs.append([])
                for v in range(nv):
                    p = ptr(c_arr, builder.add(row_off, builder.add(j0v, ir.Constant(intp, v * w))))
                    slot = cgutils.alloca_once(builder, vec)
                    builder.store(builder.select(accv, vload(p), zero), slot)
                    c_ptrs[r].append(p)
                    accs[r].append(slot)
            a_rows = [builder.mul(builder.add(i0v, ir.Constant(intp, r)), a_rs) for r in range(mr)]
            with cgutils.for_range(builder, K) as loop:  # the k loop: everything stays in registers
                k = loop.index
                b_row = builder.add(builder.mul(k, b_rs), j0v)
                bv = [vload(ptr(b_arr, builder.add(b_row, ir.Constant(intp, v * w)))) for v in range(nv)]
                a_col = builder.mul(k, a_cs)
                for r in range(mr):
                    av = splat(builder.load(ptr(a_arr, builder.add(a_rows[r], a_col)), typ=el))
                    for v in range(nv):
                        builder.store(builder.call(fma, [av, bv[v], builder.load(accs[r][v], typ=vec)]), accs[r][v])
            for r in range(mr):
                for v in range(nv):
                    vstore(builder.load(accs[r][v], typ=vec), c_ptrs[r][v])
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_block_mr_nv = _make_block_kernel(MR, NV)  # the main block
_block_1_nv = _make_block_kernel(1, NV)  # leftover rows
_block_mr_1 = _make_block_kernel(MR, 1)  # leftover columns, one vector wide
_block_1_1 = _make_block_kernel(1, 1)


@njit(**HELPER)
def matmul_tile(c, a, b, accumulate):
    """c = a @ b, or c += a @ b when ``accumulate``.

    c (M, N), a (M, K) with any strides, b (K, N); c and b need unit column stride.
    """
    M, K = a.shape
    N = b.shape[1]
    w = VEC_BYTES // c.itemsize  # SIMD lanes
    m_main = M - M % MR
    n_wide = N - N % (NV * w)
    n_vec = N - N % w
    for j0 in range(0, n_wide, NV * w):  # blocks of MR rows x NV vectors
        for i0 in range(0, m_main, MR):
            _block_mr_nv(c, a, b, i0, j0, accumulate)
        for i0 in range(m_main, M):
            _block_1_nv(c, a, b, i0, j0, accumulate)
    for j0 in range(n_wide, n_vec, w):  # columns left over: one vector at a time
        for i0 in range(0, m_main, MR):
            _block_mr_1(c, a, b, i0, j0, accumulate)
        for i0 in range(m_main, M):
            _block_1_1(c, a, b, i0, j0, accumulate)
    if n_vec < N:  # the last few columns (fewer than one vector): plain loops
        for i in range(M):
            for j in range(n_vec, N):
                acc = c[i, j] if accumulate else c.dtype.type(0.0)
                for kk in range(K):
                    acc += a[i, kk] * b[kk, j]
                c[i, j] = acc


__all__ = ["matmul_tile", "MR", "NV", "VEC_BYTES"]
