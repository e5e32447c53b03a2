"""Attention stage by stage: the ``scores``, ``softmax`` and ``weighted_sum`` kernels of each backend, against the
oracle's (the ``numpy`` backend, the baseline) and PyTorch's ``matmul`` / ``softmax``.

scores: GFLOP/s = 2·N²·d·H·B / t, half when causal (useful work: hidden entries are only set to -inf).
softmax: GB/s = 2·B·H·N²·itemsize / t (the rows read and written once). weighted_sum: GFLOP/s = 2·N²·d·H·B / t
(the kernel does not know which weights are zero, so no mask here).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fastattn import oracle

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

#: (B, H, N, d) per grid: up to the sizes where the N² score matrix still fits easily (fused goes further).
SHAPES = {
    "full": [(1, 12, n, 64) for n in (128, 512, 1024, 2048)],
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
    """q, k, v (B, H, N, d) of the fixed seed."""
    rng = np.random.default_rng(SEED)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def probabilities(shape, dtype):
    """Attention weights p (B, H, N, N): rows of a softmax, of the fixed seed."""
    rng = np.random.default_rng(SEED + 1)
    return oracle.softmax(rng.standard_normal(shape[:3] + (shape[2],))).astype(dtype)


def _kernels(fa_kernels, backend):
    """The raw kernels: the compiled backend's, or the oracle's (the ``numpy`` backend)."""
    return fa_kernels("numpy" if backend == "oracle" else backend)


def _role(backend):
    return {"oracle": "baseline", "torch": "peer"}.get(backend, "fastattn")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores(measure, fa_kernels, request, dtype, shape, mask, backend):
    B, H, N, d = shape
    causal = mask == "causal"
    q, k, _ = qkv(shape, dtype)
    scale = 1.0 / math.sqrt(d)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        tq, tkt = torch.from_numpy(q), torch.from_numpy(k).transpose(-1, -2)
        hidden = torch.from_numpy(~oracle.causal_mask(N, N))

        def fn():
            s = torch.matmul(tq, tkt).mul_(scale)
            return s.masked_fill_(hidden, -math.inf) if causal else s

    else:
        kern = _kernels(fa_kernels, backend)
        out = np.empty((B, H, N, N), dtype=dtype)
        no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (B, H, N, N))
        no_bias = np.broadcast_to(np.zeros((1, 1), dtype=dtype), (B, N))

        def fn():
            kern.scores(out, q, k, scale, causal, 0, 0, no_mask, False, no_bias, False)
            return out

    measure(
        fn,
        group=f"scores {dtype} {shape_id(shape)} {mask}",
        backend=backend,
        role=_role(backend),
        flop=2.0 * B * H * N * N * d * (0.5 if causal else 1.0),
        dtype=dtype,
        shape=list(shape),
        causal=causal,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(measure, fa_kernels, request, dtype, shape, backend):
    B, H, N, d = shape
    rng = np.random.default_rng(SEED)
    s = rng.standard_normal((B * H * N, N)).astype(dtype)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        ts = torch.from_numpy(s)

        def fn():
            return torch.softmax(ts, dim=-1)

    else:
        kern = _kernels(fa_kernels, backend)
        out = np.empty_like(s)

        def fn():
            kern.softmax(out, s)
            return out

    measure(
        fn,
        group=f"softmax {dtype} {shape_id(shape)}",
        backend=backend,
        role=_role(backend),
        nbytes=2.0 * s.size * s.itemsize,
        dtype=dtype,
        shape=list(shape),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_sum(measure, fa_kernels, request, dtype, shape, backend):
    B, H, N, d = shape
    _, _, v = qkv(shape, dtype)
    p = probabilities(shape, dtype)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        tp, tv = torch.from_numpy(p), torch.from_numpy(v)

        def fn():
            return torch.matmul(tp, tv)

    else:
        kern = _kernels(fa_kernels, backend)
        out = np.empty(shape, dtype=dtype)

        def fn():
            kern.weighted_sum(out, p, v)
            return out

    measure(
        fn,
        group=f"weighted_sum {dtype} {shape_id(shape)}",
        backend=backend,
        role=_role(backend),
        flop=2.0 * B * H * N * N * d,
        dtype=dtype,
        shape=list(shape),
    )
