"""Fused attention: each compiled backend's ``attention`` kernel (flash style, O(N) memory) against the oracle
(``fastattn.oracle.scaled_dot_product_attention``, the baseline) and PyTorch's ``scaled_dot_product_attention``.

GFLOP/s = 4·N²·d·H·B / t (QKᵀ and PV), half of it when causal. One benchmark group per dtype, shape and mask.

``test_cython_tile_products`` compares the three ways the Cython kernel can multiply its tiles (its micro-kernel,
the default; SciPy's BLAS; its plain loops), one group per dtype, shape and mask, the loops as the baseline.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fastattn import _timing, oracle

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

#: (B, H, N, d) per grid.
SHAPES = {
    "full": [(1, 12, n, 64) for n in (128, 512, 1024, 2048, 4096)],
    "quick": [(1, 12, n, 64) for n in (128, 512)],
    "smoke": [(1, 2, 16, 8)],
}[GRID]
DTYPES = {"full": ["float32", "float64"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
MASKS = ["full", "causal"]
BACKENDS = ["numba", "cython", "oracle", "torch"]


def shape_id(shape):
    B, H, N, d = shape
    return f"B{B}-H{H}-N{N}-d{d}"


def qkv(shape, dtype):
    rng = np.random.default_rng(SEED)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, H, N, d = shape
    causal = mask == "causal"
    q, k, v = qkv(shape, dtype)
    role = "fastattn"
    if backend == "oracle":
        role = "baseline"

        def fn():
            return oracle.scaled_dot_product_attention(q, k, v, is_causal=causal)

    elif backend == "torch":
        torch = request.getfixturevalue("torch")
        role = "peer"
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def fn():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=causal)

    else:
        kern = fa_kernels(backend)
        out = np.zeros(shape, dtype=dtype)
        scale = 1.0 / math.sqrt(d)
        no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (B, H, N, N))
        no_bias = np.broadcast_to(np.zeros((1, 1), dtype=dtype), (B, N))

        lse = np.empty((B, H, N), dtype=dtype)

        def fn():
            kern.attention(out, lse, q, k, v, scale, causal, 0, 0, no_mask, False, no_bias, False)
            return out

    measure(
        fn,
        group=f"attention fused {dtype} {shape_id(shape)} {mask}",
        backend=backend,
        role=role,
        flop=_timing.attention_flop(B, H, N, N, d, causal),
        dtype=dtype,
        shape=list(shape),
        causal=causal,
    )


@pytest.mark.parametrize("tiles", ["micro", "blas", "loops"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_tile_products(measure, fa_kernels, dtype, shape, mask, tiles):
    kern = fa_kernels("cython")
    from fastattn.kernels.cython import _attention

    B, H, N, d = shape
    causal = mask == "causal"
    q, k, v = qkv(shape, dtype)
    out = np.zeros(shape, dtype=dtype)
    no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (B, H, N, N))
    no_bias = np.broadcast_to(np.zeros((1, 1), dtype=dtype), (B, N))

    lse = np.empty((B, H, N), dtype=dtype)

    def fn():
        kern.attention(out, lse, q, k, v, 1.0 / math.sqrt(d), causal, 0, 0, no_mask, False, no_bias, False)
        return out

    previous = _attention._set_tile_products(tiles)
    try:
        measure(
            fn,
            group=f"cython tile products {dtype} {shape_id(shape)} {mask}",
            backend=f"cython/{tiles}",
            role="baseline" if tiles == "loops" else "fastattn",
            flop=_timing.attention_flop(B, H, N, N, d, causal),
            dtype=dtype,
            shape=list(shape),
            causal=causal,
            tile_products=_attention.tile_products(),
        )
    finally:
        _attention._set_tile_products(previous)
