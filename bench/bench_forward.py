"""The whole forward pass through the public API: ``fastattn.forward`` (embed + positions, then self-attention) on
each compiled backend, against ``fastattn.oracle.forward`` (the baseline: its embedding is the literal one-hot
product) and the same pass in PyTorch (``nn.functional.embedding``, positions added, the self-attention block).

GFLOP/s counts the attention block only (4 projections · 2·B·N·D² + 4·B·H·N²·d, the attention half of it when
causal); the lookup is memory traffic, not FLOPs, so it adds time but no count.
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

#: (B, N, V, D, H) per grid: GPT-2 small's vocabulary, width and heads.
SHAPES = {
    "full": [(1, n, 50257, 768, 12) for n in (128, 512, 1024)],
    "quick": [(1, 128, 50257, 768, 12)],
    "smoke": [(1, 16, 100, 32, 4)],
}[GRID]
DTYPES = {"full": ["float32", "float64"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
MASKS = ["full", "causal"]
BACKENDS = ["numba", "cython", "oracle", "torch"]


def shape_id(shape):
    B, N, V, D, H = shape
    return f"B{B}-N{N}-V{V}-D{D}-H{H}"


@functools.lru_cache(maxsize=2)
def inputs(shape, dtype):
    """Token ids (B, N) and ``fastattn.init_params`` weights of the fixed seed."""
    B, N, V, D, H = shape
    params = fastattn.init_params(V, D, H, max_positions=N, seed=SEED, dtype=dtype)
    ids = np.random.default_rng(SEED + 1).integers(0, V, size=(B, N), dtype=np.int64)
    return ids, params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, N, V, D, H = shape
    causal = mask == "causal"
    ids, params = inputs(shape, dtype)
    role = "fastattn"
    if backend == "oracle":
        role = "baseline"

        def fn():
            return oracle.forward(ids, params, is_causal=causal)

    elif backend == "torch":
        torch = request.getfixturevalue("torch")
        role = "peer"
        block = request.getfixturevalue("torch_self_attention")(
            params.w_q, params.w_k, params.w_v, params.w_o, H, causal
        )
        ttable, tpos, tids = (torch.from_numpy(a) for a in (params.embedding, params.positions[:N], ids))
        embedding = torch.nn.functional.embedding

        def fn():
            with torch.no_grad():
                return block(embedding(tids, ttable).add_(tpos))

    else:
        fa_kernels(backend)  # skips cleanly when the backend cannot run

        def fn():
            return fastattn.forward(ids, params, is_causal=causal, backend=backend)

    measure(
        fn,
        group=f"forward {dtype} {shape_id(shape)} {mask}",
        backend=backend,
        role=role,
        flop=4 * 2.0 * B * N * D * D + _timing.attention_flop(B, H, N, N, D // H, causal),
        dtype=dtype,
        shape=list(shape),
        causal=causal,
    )
