"""``out=`` on the public forward functions: the result lands in the caller's buffer, bitwise as without ``out``,
and a buffer of the wrong kind is refused (naming ``out``) before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

import fastattn


def _cases(rng, dtype):
    table = rng.standard_normal((50, 8)).astype(dtype)
    ids = rng.integers(0, 50, (3, 7))
    x = rng.standard_normal((2, 7, 8)).astype(dtype)
    pe = fastattn.sinusoidal_positions(16, 8, dtype=dtype)
    q, k, v = (rng.standard_normal((2, 3, 7, 8)).astype(dtype) for _ in range(3))
    mask = rng.random((7, 7)) > 0.2
    return {
        "embed": (lambda **kw: fastattn.embed(ids, table, **kw), (3, 7, 8), {"table": table}),
        "add_positions": (lambda **kw: fastattn.add_positions(x, pe, offset=2, **kw), x.shape, {"x": x}),
        "apply_rope": (lambda **kw: fastattn.apply_rope(x, offset=1, **kw), x.shape, {"x": x}),
        "sdpa": (lambda **kw: fastattn.scaled_dot_product_attention(q, k, v, **kw), q.shape, {"query": q}),
        "sdpa_causal": (
            lambda **kw: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, **kw),
            q.shape,
            {"value": v},
        ),  # fmt: skip
        "sdpa_mask": (lambda **kw: fastattn.scaled_dot_product_attention(q, k, v, mask, **kw), q.shape, {"key": k}),
    }


NAMES = ["embed", "add_positions", "apply_rope", "sdpa", "sdpa_causal", "sdpa_mask"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_out_gets_the_result(backend, name, dtype):
    fn, shape, _ = _cases(np.random.default_rng(1), dtype)[name]
    want = fn(backend=backend)
    out = np.full(shape, np.nan, dtype)  # stale contents must not leak through
    got = fn(out=out, backend=backend)
    assert got is out
    np.testing.assert_array_equal(out, want)
    got = fn(out=out, backend=backend)  # reused
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name", NAMES)
def test_bad_out_is_refused_and_nothing_written(backend, name):
    fn, shape, inputs = _cases(np.random.default_rng(2), np.float32)[name]
    with pytest.raises(TypeError, match=r"out must be a NumPy array \(or None\), got list"):
        fn(out=[0.0], backend=backend)
    with pytest.raises(TypeError, match=r"out must have dtype float32 \(the result's\), got: out.dtype=float64"):
        fn(out=np.zeros(shape, np.float64), backend=backend)
    wrong = shape[:-1] + (shape[-1] + 1,)
    with pytest.raises(ValueError, match=rf"out must have shape {re_shape(shape)}, got shape {re_shape(wrong)}"):
        fn(out=np.zeros(wrong, np.float32), backend=backend)
    strided = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        fn(out=strided, backend=backend)
    assert not strided.any()
    ro = np.zeros(shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        fn(out=ro, backend=backend)
    ((arg, a),) = inputs.items()
    before = a.copy()
    alias = a if a.shape == shape else None
    if alias is not None:
        with pytest.raises(ValueError, match=f"out must not share memory with {arg}"):
            fn(out=alias, backend=backend)
        np.testing.assert_array_equal(a, before)


def re_shape(shape):
    import re

    return re.escape(str(tuple(shape)))


def test_embed_out_must_not_alias_the_table(backend):
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    before = table.copy()
    with pytest.raises(ValueError, match="out must not share memory with table"):
        fastattn.embed([1, 2], table, out=table[:2], backend=backend)
    np.testing.assert_array_equal(table, before)


def test_sdpa_out_with_broadcast_leading_dims_and_no_keys(backend):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 6, 4)).astype(np.float32)
    v = rng.standard_normal((3, 6, 2)).astype(np.float32)
    out = np.empty((2, 3, 5, 2), np.float32)
    np.testing.assert_array_equal(
        fastattn.scaled_dot_product_attention(q, k, v, out=out, backend=backend),
        fastattn.scaled_dot_product_attention(q, k, v, backend=backend),
    )
    empty_k, empty_v = np.zeros((2, 3, 0, 4), np.float32), np.zeros((2, 3, 0, 2), np.float32)
    out.fill(np.nan)
    assert not fastattn.scaled_dot_product_attention(q, empty_k, empty_v, out=out, backend=backend).any()
