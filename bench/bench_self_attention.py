"""Multi-head self-attention through the public API: ``fastattn.self_attention`` on each compiled backend, against
``fastattn.oracle.self_attention`` (the baseline) and the same computation in PyTorch (``x @ w``, heads,
``scaled_dot_product_attention``, merge, ``@ w_o``).

GFLOP/s = (4 projections · 2·B·N·D² + 4·B·H·N²·d, the attention half of it when causal) / t.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import fastattn
from fastattn import oracle
from fastattn.tools import timing as _timing

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

#: (B, N, D, H) per grid: GPT-2 small's width and heads.
SHAPES = {
    "full": [(1, n, 768, 12) for n in (128, 512, 1024, 2048)],
    "quick": [(1, n, 768, 12) for n in (128, 512)],
    "smoke": [(1, 16, 32, 4)],
}[GRID]
DTYPES = {"full": ["float32", "float64"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
MASKS = ["full", "causal"]
BACKENDS = ["numba", "cython", "oracle", "torch"]


def shape_id(shape):
    B, N, D, H = shape
    return f"B{B}-N{N}-D{D}-H{H}"


@functools.lru_cache(maxsize=4)
def inputs(shape, dtype):
    """x (B, N, D) and the four (D, D) weights of the fixed seed."""
    B, N, D, _ = shape
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((B, N, D)).astype(dtype)
    weights = tuple((rng.standard_normal((D, D)) / np.sqrt(D)).astype(dtype) for _ in range(4))
    return x, weights


def block_flop(B, N, D, H, causal):
    return 4 * 2.0 * B * N * D * D + _timing.attention_flop(B, H, N, N, D // H, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, N, D, H = shape
    causal = mask == "causal"
    x, (w_q, w_k, w_v, w_o) = inputs(shape, dtype)
    role = "fastattn"
    if backend == "oracle":
        role = "baseline"

        def fn():
            return oracle.self_attention(x, w_q, w_k, w_v, w_o, n_heads=H, is_causal=causal)

    elif backend == "torch":
        torch = request.getfixturevalue("torch")
        role = "peer"
        block = request.getfixturevalue("torch_self_attention")(w_q, w_k, w_v, w_o, H, causal)
        tx = torch.from_numpy(x)

        def fn():
            return block(tx)

    else:
        fa_kernels(backend)  # skips cleanly when the backend cannot run

        def fn():
            return fastattn.self_attention(x, w_q, w_k, w_v, w_o, n_heads=H, is_causal=causal, backend=backend)

    measure(
        fn,
        group=f"self_attention {dtype} {shape_id(shape)} {mask}",
        backend=backend,
        role=role,
        flop=block_flop(B, N, D, H, causal),
        dtype=dtype,
        shape=list(shape),
        causal=causal,
    )
