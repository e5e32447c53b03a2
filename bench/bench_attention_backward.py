"""The backward pass: each compiled backend's fused ``attention_backward`` kernel against PyTorch's CPU
scaled_dot_product_attention backward, and ``embed_backward`` against ``torch.nn.functional.embedding``'s backward.

Attention: float32, B = 1, H = 12, d = 64, N = 1024, 2048, 4096 (full grid), full and causal. The backward alone is
timed: our kernel from the forward's saved ``out`` and ``lse``; PyTorch's ``.backward(grad)`` on a graph built once
outside the timer and kept with ``retain_graph=True`` (the gradients reset to None before each call).
GFLOP/s counts 2.5x the forward's 4·N²·d·H·B (half when causal): the backward's five tile products (two of them
recomputing the forward's scores and dP) against the forward's two. ``torch`` is the row speed-ups are taken over.

Embedding: 65,536 ids into GPT-2's 50,257 x 768 table: our ``gather_backward`` (a counting sort, then each row of
the table summed by one thread) against ``torch.nn.functional.embedding(...).backward(grad)`` (graph kept as above).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fastattn import _timing

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

SHAPES = {
    "full": [(1, 12, n, 64) for n in (1024, 2048, 4096)],
    "quick": [(1, 12, n, 64) for n in (256, 1024)],
    "smoke": [(1, 2, 16, 8)],
}[GRID]
EMBED_SHAPES = {"full": [(65536, 50257, 768)], "quick": [(4096, 50257, 768)], "smoke": [(64, 100, 16)]}[GRID]
MASKS = ["full", "causal"]
BACKENDS = ["numba", "cython", "torch"]


def shape_id(shape):
    return "-".join(f"{k}{v}" for k, v in zip("BHNd", shape, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", ["float32"])
def test_attention_backward(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, H, N, d = shape
    causal = mask == "causal"
    rng = np.random.default_rng(SEED)
    q, k, v, g = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    role = "fastattn"
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        role = "peer"
        tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tg = torch.from_numpy(g)

        def fn():
            for t in (tq, tk, tv):
                t.grad = None
            out.backward(tg, retain_graph=True)
            return tq.grad

    else:
        kern = fa_kernels(backend)
        if not hasattr(kern, "attention_backward"):
            pytest.skip(f"backend {backend} has no attention_backward kernel in this build")
        scale = 1.0 / math.sqrt(d)
        no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), np.dtype(dtype)), (B, H, N, N))
        no_bias = np.broadcast_to(np.zeros((1, 1), np.dtype(dtype)), (B, N))
        out, lse = np.empty(shape, np.dtype(dtype)), np.empty((B, H, N), np.dtype(dtype))
        kern.attention(out, lse, q, k, v, scale, causal, 0, 0, no_mask, False, no_bias, False)
        gq, gk, gv = (np.empty(shape, np.dtype(dtype)) for _ in range(3))

        def fn():
            kern.attention_backward(gq, gk, gv, g, q, k, v, out, lse, scale, causal, 0, 0, no_mask, False, no_bias,
                                    False)  # fmt: skip
            return gq

    measure(
        fn,
        group=f"attention backward float32 {shape_id(shape)} {mask}",
        backend=backend,
        role=role,
        flop=2.5 * _timing.attention_flop(B, H, N, N, d, causal),
        dtype="float32",
        shape=list(shape),
        causal=causal,
    )


@pytest.mark.parametrize("backend", ["numba", "cython", "torch"])
@pytest.mark.parametrize("shape", EMBED_SHAPES, ids=lambda s: "T{}-V{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", ["float32"])
def test_embed_backward(measure, fa_kernels, request, dtype, shape, backend):
    T, V, D = shape
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, V, size=T, dtype=np.int64)
    g = rng.standard_normal((T, D)).astype(np.dtype(dtype))
    role = "fastattn"
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        role = "peer"
        table = torch.zeros((V, D), dtype=torch.float32, requires_grad=True)
        out = torch.nn.functional.embedding(torch.from_numpy(ids), table)
        tg = torch.from_numpy(g)

        def fn():
            table.grad = None
            out.backward(tg, retain_graph=True)
            return table.grad

    else:
        kern = fa_kernels(backend)
        if not hasattr(kern, "gather_backward"):
            pytest.skip(f"backend {backend} has no gather_backward kernel in this build")
        grad = np.empty((V, D), np.dtype(dtype))

        def fn():
            kern.gather_backward(grad, g, ids)
            return grad

    measure(
        fn,
        group=f"embed backward float32 T{T}-V{V}-D{D}",
        backend=backend,
        role=role,
        nbytes=4.0 * (V * D + 2 * T * D) + 8.0 * T,
        dtype="float32",
        shape=list(shape),
    )
