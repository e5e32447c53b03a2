"""Scalar helpers the kernels inline: a vectorisable ``exp`` and typed constants.

Why a hand-written exp: this Numba has no SVML, so ``np.exp`` inside a loop is a scalar libm call (about 3 ns an
element) and the loop cannot be vectorised. ``fast_exp`` for float32 is range reduction plus a polynomial
(Cephes ``expf``), a few multiply-adds that LLVM turns into AVX-512 code (about 0.13 ns an element); its relative
error is below 3e-7 (2-3 ulp). It maps ``-inf`` and anything below ``log(FLT_MIN)`` to exactly 0 and keeps NaN.
For float64 it is ``np.exp`` itself: float64 results must agree with NumPy to ~1e-10 and are not the fast path.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import config as _numba_config
from numba.extending import intrinsic, overload

from ._config import HELPER

if _numba_config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (coverage runs): plain Python stand-ins for the intrinsics

    def _bits_as_float32(i):
        return np.array(i, dtype=np.int32).view(np.float32)[()]

    def maxnum(a, b):
        return np.fmax(a, b)

else:

    @intrinsic
    def maxnum(typingctx, a, b):
        """max(a, b) ignoring NaN (LLVM ``maxnum``, like ``np.fmax``).

        A running max written ``if x > m: m = x`` is not vectorised (without ``nnan`` LLVM must keep the order of
        the compares); a ``maxnum`` reduction is, about 6x faster on a 512-key row.
        """
        from llvmlite import ir

        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            t = args[0].type
            fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
            return builder.call(fn, args)

        return a(a, b), codegen

    @intrinsic
    def _bits_as_float32(typingctx, i):
        """Reinterpret the low 32 bits of an integer as a float32 (a free register move, vectorisable)."""
        from llvmlite import ir

        if not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen


@njit(**HELPER)
def exp_f32(x):
    """exp(x) for float32 x <= 88 (softmax arguments are <= 0): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2."""
    lo = np.float32(-87.33654)  # log(FLT_MIN): below it the result is 0 (no denormals)
    xc = x
    if xc < lo:  # written so that NaN is not clamped (NaN < lo is False)
        xc = lo
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375)  # ln2 split in two for an exact reduction (Cody-Waite)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    two_n = _bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))  # 2^n built in the exponent bits
    y = p * two_n
    if x < lo:
        y = np.float32(0.0)
    return y


def fast_exp(x):
    """exp for the kernels: the polynomial for float32, ``np.exp`` for float64 (pure Python: ``np.exp``)."""
    if isinstance(x, np.float32):
        return exp_f32(x)
    return np.exp(x)


@overload(fast_exp, jit_options={"fastmath": HELPER["fastmath"]})
def _ol_fast_exp(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: np.exp(x)
    return None
