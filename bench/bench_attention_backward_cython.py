"""Fused attention backward: the Cython kernel ``attention_backward`` against PyTorch's CPU backward of
``scaled_dot_product_attention`` (the backward alone: PyTorch's graph is built once, outside the timing, and
``torch.autograd.grad(..., retain_graph=True)`` runs only its backward).

GFLOP/s = 2.5 × the forward's 4·N²·d·H·B (QKᵀ and PV recomputed, dP, dV, dK, dQ: 10·N²·d·H·B), half of it when
causal. One benchmark group per dtype, shape and mask.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fastattn import _timing

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

#: (B, H, N, d) per grid.
SHAPES = {
    "full": [(1, 12, n, 64) for n in (1024, 2048, 4096)],
    "quick": [(1, 12, n, 64) for n in (512, 1024)],
    "smoke": [(1, 2, 16, 8)],
}[GRID]
DTYPES = {"full": ["float32"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
MASKS = ["full", "causal"]


def shape_id(shape):
    B, H, N, d = shape
    return f"B{B}-H{H}-N{N}-d{d}"


@pytest.mark.parametrize("backend", ["cython", "torch"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_backward(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, H, N, d = shape
    causal = mask == "causal"
    rng = np.random.default_rng(SEED)
    q, k, v, grad_out = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tgrad = torch.from_numpy(grad_out)

        def fn():
            return torch.autograd.grad(tout, (tq, tk, tv), tgrad, retain_graph=True)

        role = "peer"
    else:
        kern = fa_kernels(backend)
        no_mask = np.broadcast_to(np.zeros((), dtype=dtype), (B, H, N, N))
        no_bias = np.broadcast_to(np.zeros((), dtype=dtype), (B, N))
        out, lse = np.empty(shape, dtype=dtype), np.empty((B, H, N), dtype=dtype)
        kern.attention(out, lse, q, k, v, scale, causal, 0, 0, no_mask, False, no_bias, False)
        grads = tuple(np.empty(shape, dtype=dtype) for _ in range(3))

        def fn():
            kern.attention_backward(
                *grads, grad_out, q, k, v, out, lse, scale, causal, 0, 0, no_mask, False, no_bias, False
            )
            return grads

        role = "fastattn"
    measure(
        fn,
        group=f"attention backward {dtype} {shape_id(shape)} {mask}",
        backend=backend,
        role=role,
        flop=2.5 * _timing.attention_flop(B, H, N, N, d, causal),
        dtype=dtype,
        shape=list(shape),
        causal=causal,
    )
