"""Embedding lookup: each compiled backend's ``gather`` against NumPy fancy indexing ``table[ids]`` (the baseline),
the literal one-hot oracle (where it is affordable), ``torch.nn.functional.embedding`` and ``torch.index_select``.

GB/s = (2·T·D·itemsize + 8·T) / t: the rows read, the rows written, the int64 ids. The oracle multiplies a
(T, V) one-hot matrix by the table, 2·T·V·D FLOPs (5 TFLOP for 65,536 ids into GPT-2's 50,257 × 768 table),
so it only runs where that stays under ``ORACLE_MAX_FLOP``; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0
ORACLE_MAX_FLOP = 4e10

#: (T ids, V rows, D columns) per grid; 50,257 x 768 is GPT-2's token table.
SHAPES = {
    "full": [(256, 50257, 768), (4096, 50257, 768), (65536, 50257, 768)],
    "quick": [(256, 50257, 768), (4096, 50257, 768)],
    "smoke": [(64, 100, 16)],
}[GRID]
DTYPES = {"full": ["float32", "float64"], "quick": ["float32"], "smoke": ["float32", "float64"]}[GRID]
BACKENDS = ["numba", "cython", "oracle", "numpy", "torch", "torch-index_select"]


def shape_id(shape):
    T, V, D = shape
    return f"T{T}-V{V}-D{D}"


@functools.lru_cache(maxsize=2)
def table_of(V, D, dtype):
    """The (V, D) table of the fixed seed, made once per size and dtype (150 MB in float32 at GPT-2's size)."""
    return np.random.default_rng(SEED).standard_normal((V, D), dtype=np.float64).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather(measure, fa_kernels, request, dtype, shape, backend):
    T, V, D = shape
    table = table_of(V, D, dtype)
    ids = np.random.default_rng(SEED + 1).integers(0, V, size=T, dtype=np.int64)
    role = "fastattn"
    if backend == "numpy":
        role = "baseline"

        def fn():
            return table[ids]

    elif backend.startswith("torch"):
        torch = request.getfixturevalue("torch")
        role = "peer"
        ttable, tids = torch.from_numpy(table), torch.from_numpy(ids)
        embedding = torch.nn.functional.embedding

        if backend == "torch":

            def fn():
                return embedding(tids, ttable)

        else:

            def fn():
                return torch.index_select(ttable, 0, tids)

    else:
        if backend == "oracle":
            role = "oracle"
            flop = 2.0 * T * V * D
            if flop > ORACLE_MAX_FLOP:
                pytest.skip(
                    f"the one-hot oracle would do {flop / 1e12:.2f} TFLOP here; numpy table[ids] is the baseline"
                )
        kern = fa_kernels("numpy" if backend == "oracle" else backend)
        out = np.empty((T, D), dtype=dtype)

        def fn():
            kern.gather(out, ids, table)
            return out

    measure(
        fn,
        group=f"gather {dtype} {shape_id(shape)}",
        backend=backend,
        role=role,
        nbytes=2.0 * T * D * table.itemsize + 8.0 * T,
        dtype=dtype,
        shape=list(shape),
    )
