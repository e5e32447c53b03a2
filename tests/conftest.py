"""Shared fixtures and the tolerance rule of the test suite.

Tolerance follows from precision (flash-attention's rule): a float32 result's error against the float64 oracle
must stay within ``FLOAT32_FACTOR`` times the error of the naive float32 computation (the oracle run in float32),
plus a few ulps of the result's scale; float64 results must agree with the float64 oracle to about 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn

FLOAT32_FACTOR = 4.0
FLOAT64_RTOL = 1e-10

BACKENDS = fastattn.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=COMPILED or ["numpy"])
def compiled_backend(request):
    return request.param


def check_against_oracle(got, oracle_fn, inputs, *, cast=None):
    """Assert ``got`` matches ``oracle_fn`` evaluated in float64 within the tolerance rule of its dtype.

    ``inputs``: tuple of positional arguments (arrays are cast to float64 for the reference and kept in their own
    dtype for the naive same-precision computation). ``cast``: indices of arguments that are floats to cast
    (default: every floating ndarray).
    """
    got = np.asarray(got)

    def to(dtype):
        return tuple(
            a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" and (cast is None or i in cast) else a
            for i, a in enumerate(inputs)
        )

    ref = np.asarray(oracle_fn(*to(np.float64)), dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), "NaN pattern differs from the oracle"
    scale = float(np.max(np.abs(ref[finite]), initial=0.0)) + 1.0
    err = float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0))
    if got.dtype == np.float64:
        bound = FLOAT64_RTOL * scale
    else:
        naive = np.asarray(oracle_fn(*to(got.dtype)), dtype=np.float64)
        naive_err = float(np.max(np.abs(naive[finite] - ref[finite]), initial=0.0))
        bound = FLOAT32_FACTOR * naive_err + 4 * float(np.finfo(got.dtype).eps) * scale
    assert err <= bound, f"error {err:.3e} exceeds the {got.dtype} bound {bound:.3e}"
    return err, bound
