"""Shared fixtures and the tolerance rule of the test suite.

Tolerance follows from precision (flash-attention's rule): a float32 result's error against the float64 oracle
must stay within ``FLOAT32_FACTOR`` times the error of the naive float32 computation (the oracle run in float32),
plus a few ulps of the result's scale; float64 results must agree with the float64 oracle to about 1e-10.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastattn

FLOAT32_FACTOR = 4.0
FLOAT64_RTOL = 1e-10

BACKENDS = fastattn.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]


# Each compiled backend multiplies its attention tiles one of three ways: its own register-blocked micro-kernel (the
# default: plain "cython" and "numba"), SciPy's BLAS, or plain loops (kernels/cython/_attention.pyx,
# kernels/numba/attention_fused.py). The oracle suites (test_backends, test_properties) run every one:
# "cython/blas" is the backend "cython" with its BLAS tile products, "numba/loops" the Numba backend's loops engine.
def _tile_variants():
    variants = [f"cython/{tiles}" for tiles in ("blas", "loops")] if "cython" in BACKENDS else []
    if "numba" in BACKENDS:
        from fastattn.kernels.numba import _config

        variants += [f"numba/{engine}" for engine in ("blas", "loops") if engine != "blas" or _config.HAVE_SCIPY]
    return variants


TILE_VARIANTS = _tile_variants()
BACKEND_VARIANTS = BACKENDS + TILE_VARIANTS
COMPILED_VARIANTS = COMPILED + TILE_VARIANTS


@contextlib.contextmanager
def backend_variant(variant):
    """Yield the backend name of ``variant`` ("cython/blas" -> "cython") with its tile products set for the block
    (Cython's BLAS then serves every call it can, however small); the defaults are back afterwards."""
    name, _, tiles = variant.partition("/")
    if not tiles:
        yield name
        return
    if name == "numba":
        from fastattn.kernels import numba

        previous_engine, numba.ENGINE = numba.ENGINE, tiles
        try:
            yield name
        finally:
            numba.ENGINE = previous_engine
        return
    from fastattn.kernels.cython import _attention

    previous = _attention._set_tile_products(tiles)
    min_work = _attention._set_blas_min_work(0)
    try:
        yield name
    finally:
        _attention._set_tile_products(previous)
        _attention._set_blas_min_work(min_work)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=BACKEND_VARIANTS)
def backend_or_variant(request):
    """Every backend, and the Cython backend once more per other way of multiplying tiles (``backend_variant``).
    A module runs its ``backend`` tests on all of them by overriding the fixture:
    ``@pytest.fixture`` ``def backend(backend_or_variant): return backend_or_variant``."""
    with backend_variant(request.param) as name:
        yield name


@pytest.fixture(params=COMPILED or ["numpy"])
def compiled_backend(request):
    return request.param


def score_rounding_floor(q, k, v, scale=None):
    """The error a float32 attention cannot avoid: a score s stored in float32 is off by up to eps·|s|, which moves
    its softmax weight by that much relative, and the output by that times |v|. The naive float32 computation can
    be luckier than this on one small example (its error is a random variable); the bound is not.
    Uses |s| <= |scale|·max‖q‖·max‖k‖ (Cauchy-Schwarz), so nothing of size L x S is built."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    if q.size == 0 or k.size == 0 or v.size == 0:
        return 0.0
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else abs(scale)
    s_max = scale * np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()
    return float(np.finfo(np.float32).eps * s_max * np.abs(v).max())


def check_against_oracle(got, oracle_fn, inputs, *, cast=None, floor=0.0):
    """Assert ``got`` matches ``oracle_fn`` evaluated in float64 within the tolerance rule of its dtype.

    ``inputs``: tuple of positional arguments (arrays are cast to float64 for the reference and kept in their own
    dtype for the naive same-precision computation). ``cast``: indices of arguments that are floats to cast
    (default: every floating ndarray). ``floor``: an error the dtype cannot avoid (see ``score_rounding_floor``),
    used in place of the naive error when the naive computation happens to do better than it.
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
        bound = FLOAT32_FACTOR * max(naive_err, floor) + 4 * float(np.finfo(got.dtype).eps) * scale
    assert err <= bound, f"error {err:.3e} exceeds the {got.dtype} bound {bound:.3e}"
    return err, bound


def _backward_backends():
    """The backends whose kernel module has the backward kernels (``attention_backward`` and the rest)."""
    from fastattn import _backends

    return [b for b in BACKENDS if hasattr(_backends.kernels(b), "attention_backward")]


# The backward suites (tests/test_backward*.py) run on the backends that implement the backward kernels. The Cython
# backward kernels are written on another branch (cython-backward): once they are merged, the integrator switches
# this fixture to every backend (params=BACKENDS), so that a backend without them fails instead of being skipped.
BACKWARD_BACKENDS = _backward_backends()


@pytest.fixture(params=BACKWARD_BACKENDS)
def backward_backend(request):
    return request.param
