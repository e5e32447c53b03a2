"""Positional encoding: ``add_positions``, the fused ``gather_add_positions`` (what ``fastattn.forward`` runs) and
``rope`` (both layouts) of each compiled backend, against the oracle (the ``numpy`` backend) and PyTorch.

All three are memory bound: GB/s = bytes that must be read and written once / t.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from fastattn._call import rope_tables
from fastattn.functional import sinusoidal_positions

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0
ORACLE_MAX_FLOP = 1e11  # the oracle's gather is a one-hot product: 2·T·V·D FLOPs

#: add_positions: (B, N, D)
ADD_SHAPES = {
    "full": [(1, 1024, 768), (8, 1024, 768), (1, 4096, 768)],
    "quick": [(1, 1024, 768)],
    "smoke": [(2, 8, 16)],
}[GRID]
#: gather_add_positions: (B, N, V, D)
GATHER_SHAPES = {
    "full": [(1, 1024, 50257, 768), (8, 1024, 50257, 768)],
    "quick": [(1, 1024, 50257, 768)],
    "smoke": [(2, 8, 100, 16)],
}[GRID]
#: rope: (B·H, N, d)
ROPE_SHAPES = {
    "full": [(12, 1024, 64), (12, 4096, 64)],
    "quick": [(12, 1024, 64)],
    "smoke": [(2, 8, 8)],
}[GRID]
DTYPES = {"full": ["float32", "float64"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
BACKENDS = ["numba", "cython", "oracle", "torch"]


def dims_id(names, values):
    return "-".join(f"{k}{v}" for k, v in zip(names, values, strict=True))


def add_id(shape):
    return dims_id(("B", "N", "D"), shape)


def gather_id(shape):
    return dims_id(("B", "N", "V", "D"), shape)


def rope_id(shape):
    return dims_id(("BH", "N", "d"), shape)


def _role(backend):
    return {"oracle": "baseline", "torch": "peer"}.get(backend, "fastattn")


def _kernels(fa_kernels, backend):
    return fa_kernels("numpy" if backend == "oracle" else backend)


@functools.lru_cache(maxsize=2)
def table_of(V, D, dtype):
    return np.random.default_rng(SEED).standard_normal((V, D), dtype=np.float64).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=add_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_positions(measure, fa_kernels, request, dtype, shape, backend):
    B, N, D = shape
    x = np.random.default_rng(SEED).standard_normal(shape).astype(dtype)
    pos = sinusoidal_positions(N, D, dtype=dtype)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        tx, tpos = torch.from_numpy(x), torch.from_numpy(pos)
        tout = torch.empty_like(tx)

        def fn():
            return torch.add(tx, tpos, out=tout)

    else:
        kern = _kernels(fa_kernels, backend)
        out = np.empty_like(x)

        def fn():
            kern.add_positions(out, x, pos, 0)
            return out

    measure(
        fn,
        group=f"add_positions {dtype} {add_id(shape)}",
        backend=backend,
        role=_role(backend),
        nbytes=(2.0 * B * N * D + N * D) * x.itemsize,
        dtype=dtype,
        shape=list(shape),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=gather_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_add_positions(measure, fa_kernels, request, dtype, shape, backend):
    B, N, V, D = shape
    table = table_of(V, D, dtype)
    pos = sinusoidal_positions(N, D, dtype=dtype)
    ids = np.random.default_rng(SEED + 1).integers(0, V, size=B * N, dtype=np.int64)
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        ttable, tids, tpos = torch.from_numpy(table), torch.from_numpy(ids), torch.from_numpy(pos)
        embedding = torch.nn.functional.embedding

        def fn():
            return embedding(tids, ttable).view(B, N, D).add_(tpos)

    else:
        if backend == "oracle" and 2.0 * B * N * V * D > ORACLE_MAX_FLOP:
            pytest.skip(f"the one-hot oracle would do {2.0 * B * N * V * D / 1e12:.2f} TFLOP here")
        kern = _kernels(fa_kernels, backend)
        out = np.empty((B * N, D), dtype=dtype)

        def fn():
            kern.gather_add_positions(out, ids, table, pos, N, 0)
            return out

    measure(
        fn,
        group=f"gather_add_positions {dtype} {gather_id(shape)}",
        backend=backend,
        role=_role(backend),
        nbytes=(2.0 * B * N * D + N * D) * table.itemsize + 8.0 * B * N,
        dtype=dtype,
        shape=list(shape),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=rope_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(measure, fa_kernels, request, dtype, shape, layout, backend):
    BH, N, d = shape
    interleaved = layout == "interleaved"
    x = np.random.default_rng(SEED).standard_normal(shape).astype(dtype)
    cos, sin = rope_tables(N, d, 0, 10000.0, np.dtype(dtype))  # (N, d/2) each, as apply_rope makes them
    if backend == "torch":
        torch = request.getfixturevalue("torch")
        tx, tcos, tsin = torch.from_numpy(x), torch.from_numpy(cos), torch.from_numpy(sin)

        if interleaved:

            def fn():
                x1, x2 = tx[..., 0::2], tx[..., 1::2]
                return torch.stack((x1 * tcos - x2 * tsin, x2 * tcos + x1 * tsin), dim=-1).flatten(-2)

        else:

            def fn():
                x1, x2 = tx[..., : d // 2], tx[..., d // 2 :]
                return torch.cat((x1 * tcos - x2 * tsin, x2 * tcos + x1 * tsin), dim=-1)

    else:
        kern = _kernels(fa_kernels, backend)
        out = np.empty_like(x)

        def fn():
            kern.rope(out, x, cos, sin, interleaved)
            return out

    measure(
        fn,
        group=f"rope {layout} {dtype} {rope_id(shape)}",
        backend=backend,
        role=_role(backend),
        nbytes=(2.0 * BH * N * d + N * d) * x.itemsize,
        dtype=dtype,
        shape=list(shape),
        interleaved=interleaved,
    )
