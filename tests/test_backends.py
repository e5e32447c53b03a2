"""Every backend against the NumPy oracle (float64 truth), over awkward shapes, both dtypes, every mask kind.

One suite, parametrised over the available backends: the numpy backend must pass trivially, the compiled ones
are what is really tested here. Tolerances follow conftest.check_against_oracle.
"""

import numpy as np
import pytest
from conftest import check_against_oracle

import fastattn
from fastattn import _backends, oracle


@pytest.fixture
def backend(backend_or_variant):
    """Every backend, and the Cython backend with each of its tile products (conftest.backend_variant)."""
    return backend_or_variant


DTYPES = [np.float32, np.float64]
SIZES = [1, 3, 17, 59, 97, 111, 129]


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------------------------------------ embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 59), (2, 3, 5)])
def test_embed(backend, dtype, shape):
    rng = np.random.default_rng(0)
    table = rand(rng, (97, 33), dtype)
    ids = rng.integers(0, 97, size=shape)
    got = fastattn.embed(ids, table, backend=backend)
    assert got.dtype == dtype and got.shape == shape + (33,)
    np.testing.assert_array_equal(got, oracle.embed(ids, table))  # a gather is exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1024, 1023])
def test_embed_large_output(backend, dtype, D):
    """An output of 16 MiB and more (the Cython gather streams it past the caches): every row exact, also into an
    ``out`` 4 bytes off a 16-byte boundary and rows of a length that is not a multiple of 16 bytes."""
    rng = np.random.default_rng(D)
    table = rand(rng, (301, D), dtype)
    T = (16 << 20) // (D * np.dtype(dtype).itemsize) + 7
    ids = rng.integers(0, 301, size=T)
    want = table[ids]
    np.testing.assert_array_equal(fastattn.embed(ids, table, backend=backend), want)
    buf = np.zeros(T * D + 1, dtype=np.float32 if dtype == np.float32 else np.float64)
    out = buf[1:].reshape(T, D)  # off by one element from numpy's aligned allocation
    fastattn.embed(ids, table, backend=backend, out=out)
    np.testing.assert_array_equal(out, want)
    assert buf[0] == 0  # nothing written before out


def test_embed_non_contiguous_table_and_ids(backend):
    rng = np.random.default_rng(1)
    table = rand(rng, (40, 64), np.float32)[::2, ::3]
    ids = rng.integers(0, 20, size=(6, 8)).T
    np.testing.assert_array_equal(fastattn.embed(ids, table, backend=backend), table[ids])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 5])
def test_forward_gather_add_positions(backend, dtype, offset):
    rng = np.random.default_rng(2)
    table, pos = rand(rng, (50, 24), dtype), rand(rng, (40, 24), dtype)
    ids = rng.integers(0, 50, size=(3, 17))
    out = np.empty((51, 24), dtype=dtype)
    _backends.kernels(backend).gather_add_positions(out, ids.reshape(-1), table, pos, 17, offset)
    check_against_oracle(
        out.reshape(3, 17, 24), lambda t, p: oracle.add_positions(oracle.embed(ids, t), p, offset), (table, pos)
    )


# ------------------------------------------------------------------------------------------------ positions
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 129])
def test_add_positions(backend, dtype, n):
    rng = np.random.default_rng(3)
    x = rand(rng, (2, n, 59), dtype)
    pe = fastattn.sinusoidal_positions(n + 7, 59, dtype=dtype)
    got = fastattn.add_positions(x, pe, offset=7, backend=backend)
    check_against_oracle(got, lambda a, p: oracle.add_positions(a, p, 7), (x, pe))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(1, 2), (17, 64), (3, 59, 112), (2, 2, 129, 8)])
def test_apply_rope(backend, dtype, interleaved, shape):
    rng = np.random.default_rng(4)
    x = rand(rng, shape, dtype)
    got = fastattn.apply_rope(x, offset=11, base=500.0, interleaved=interleaved, backend=backend)
    assert got.dtype == dtype
    check_against_oracle(got, lambda a: oracle.apply_rope(a, 11, 500.0, interleaved), (x,))


def test_apply_rope_non_contiguous(backend):
    rng = np.random.default_rng(5)
    x = rand(rng, (8, 32, 16), np.float64).transpose(1, 0, 2)
    np.testing.assert_allclose(fastattn.apply_rope(x, backend=backend), oracle.apply_rope(x), rtol=1e-12, atol=1e-12)


def test_sinusoidal_matches_oracle():
    for n, d in [(1, 1), (17, 59), (129, 64)]:
        np.testing.assert_allclose(
            fastattn.sinusoidal_positions(n, d, dtype=np.float64), oracle.sinusoidal_positions(n, d), atol=1e-12
        )
    assert fastattn.sinusoidal_positions(3, 4).dtype == np.float32


# ------------------------------------------------------------------------------------------------ attention
def sdpa_ref(**kw):
    return lambda q, k, v, m=None: oracle.scaled_dot_product_attention(q, k, v, m, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(1, 1), (3, 17), (17, 3), (59, 59), (97, 111), (129, 129)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_shapes_and_causal(backend, dtype, L, S, causal):
    rng = np.random.default_rng(L * 1000 + S)
    q, k, v = rand(rng, (2, 3, L, 64), dtype), rand(rng, (2, 3, S, 64), dtype), rand(rng, (2, 3, S, 40), dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    assert got.dtype == dtype and got.shape == (2, 3, L, 40)
    check_against_oracle(got, sdpa_ref(is_causal=causal), (q, k, v))


@pytest.mark.parametrize("E", [1, 3, 59, 111])
def test_sdpa_head_dims(backend, E):
    rng = np.random.default_rng(E)
    q, k, v = rand(rng, (4, 33, E), np.float32), rand(rng, (4, 29, E), np.float32), rand(rng, (4, 29, E), np.float32)
    check_against_oracle(fastattn.scaled_dot_product_attention(q, k, v, backend=backend), sdpa_ref(), (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_long_sequence(backend, dtype):
    rng = np.random.default_rng(7)
    q, k, v = (rand(rng, (1, 2, 1025, 64), dtype) for _ in range(3))
    for causal in (False, True):
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
        check_against_oracle(got, sdpa_ref(is_causal=causal), (q, k, v))


MASK_SHAPES = [(17, 23), (1, 23), (2, 1, 17, 23), (2, 3, 1, 23), (1, 3, 17, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", MASK_SHAPES)
def test_sdpa_masks(backend, dtype, kind, mshape):
    rng = np.random.default_rng(8)
    q, k, v = rand(rng, (2, 3, 17, 16), dtype), rand(rng, (2, 3, 23, 16), dtype), rand(rng, (2, 3, 23, 8), dtype)
    if kind == "bool":
        mask = rng.random(mshape) > 0.4
    else:
        mask = rand(rng, mshape, dtype)
        mask[rng.random(mshape) > 0.7] = -np.inf
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    check_against_oracle(got, lambda a, b, c, m: oracle.scaled_dot_product_attention(a, b, c, m), (q, k, v, mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_zeros(backend, dtype):
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, (2, 5, 8), dtype), rand(rng, (2, 6, 8), dtype), rand(rng, (2, 6, 4), dtype)
    keep = rng.random((2, 5, 6)) > 0.5
    keep[0, 2, :] = False
    keep[1, 4, :] = False
    add = np.where(keep, 0.0, -np.inf).astype(dtype)
    for mask in (keep, add):
        got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got[0, 2], 0.0)
        np.testing.assert_array_equal(got[1, 4], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2), (6, 3), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gqa(backend, dtype, Hq, Hkv, causal):
    rng = np.random.default_rng(Hq * 10 + Hkv)
    q = rand(rng, (2, Hq, 19, 32), dtype)
    k, v = rand(rng, (2, Hkv, 37, 32), dtype), rand(rng, (2, Hkv, 37, 24), dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend=backend)
    check_against_oracle(got, sdpa_ref(is_causal=causal, enable_gqa=True), (q, k, v))


def test_sdpa_broadcast_and_non_contiguous(backend):
    rng = np.random.default_rng(10)
    q = rand(rng, (3, 4, 64, 20), np.float64)[:, :, ::2, :16]  # (3, 4, 32, 16), strided
    k = rand(rng, (1, 4, 16, 30), np.float64).swapaxes(-1, -2)  # (1, 4, 30, 16), batch broadcast, transposed
    v = np.broadcast_to(rand(rng, (1, 1, 30, 8), np.float64), (3, 4, 30, 8))
    got = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    check_against_oracle(got, sdpa_ref(), (np.array(q), np.array(k), np.array(v)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0])
def test_sdpa_scale_and_large_logits(backend, dtype, scale):
    rng = np.random.default_rng(11)
    q, k, v = rand(rng, (2, 33, 16), dtype, 30.0), rand(rng, (2, 41, 16), dtype, 30.0), rand(rng, (2, 41, 16), dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, scale=scale, backend=backend)
    assert np.all(np.isfinite(got))
    check_against_oracle(got, sdpa_ref(scale=scale), (q, k, v))


def test_sdpa_2d_inputs(backend):
    rng = np.random.default_rng(12)
    q, k, v = rand(rng, (5, 8), np.float64), rand(rng, (7, 8), np.float64), rand(rng, (7, 3), np.float64)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    check_against_oracle(got, sdpa_ref(is_causal=True), (q, k, v))


def test_sdpa_does_not_modify_inputs(backend):
    rng = np.random.default_rng(13)
    arrays = [rand(rng, (2, 9, 8), np.float32) for _ in range(3)] + [rng.random((9, 9)) > 0.5]
    copies = [a.copy() for a in arrays]
    out = fastattn.scaled_dot_product_attention(*arrays, backend=backend)
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)
        assert not np.shares_memory(out, a)


# ------------------------------------------------------------------------------------------------ stage kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 6)])
def test_stage_kernels(backend, dtype, causal, offset):
    """scores -> softmax -> weighted_sum, each against its oracle step; GQA, a mask and a key bias on."""
    rng = np.random.default_rng(14)
    B, Hq, Hkv, L, S = 2, 4, 2, 13, 19
    q, k, v = rand(rng, (B, Hq, L, 16), dtype), rand(rng, (B, Hkv, S, 16), dtype), rand(rng, (B, Hkv, S, 8), dtype)
    mask = np.broadcast_to(np.where(rng.random((1, Hq, L, S)) > 0.2, 0.0, -np.inf).astype(dtype), (B, Hq, L, S))
    key_bias = np.broadcast_to(rand(rng, (1, S), dtype), (B, S))
    kern = _backends.kernels(backend)
    s = np.empty((B, Hq, L, S), dtype)
    kern.scores(s, q, k, 0.3, causal, offset, 0, mask, True, key_bias, True)
    full = mask + key_bias[:, None, None, :]
    if causal:
        full = full + np.where(oracle.causal_mask(L, S, offset), 0.0, -np.inf)

    def ref_scores(q_, k_):
        return oracle.attention_scores(q_, np.repeat(k_, 2, axis=1), 0.3, full)

    check_against_oracle(s, ref_scores, (q, k))
    p = np.empty_like(s)
    kern.softmax(p.reshape(-1, S), s.reshape(-1, S))
    check_against_oracle(p, oracle.softmax, (s,))
    kern.softmax(s.reshape(-1, S), s.reshape(-1, S))  # in place
    np.testing.assert_array_equal(s, p)
    o = np.empty((B, Hq, L, 8), dtype)
    kern.weighted_sum(o, p, v)
    check_against_oracle(o, lambda p_, v_: p_ @ np.repeat(v_, 2, axis=1), (p, v))
    fused = np.empty_like(o)
    kern.attention(fused, np.empty((B, Hq, L), dtype), q, k, v, 0.3, causal, offset, 0, mask, True, key_bias, True)
    check_against_oracle(
        fused,
        lambda a, b, c: (
            oracle.softmax(oracle.attention_scores(a, np.repeat(b, 2, axis=1), 0.3, full)) @ np.repeat(c, 2, axis=1)
        ),
        (q, k, v),
    )


@pytest.mark.parametrize("L,S,offset", [(1, 40, 39), (5, 40, 35), (16, 16, 0), (7, 3, -2)])
def test_fused_bottom_right_causal(backend, L, S, offset):
    """KV-cache alignment: queries at the end of the keys (causal_offset = S - L), and rows with no key."""
    rng = np.random.default_rng(15)
    q, k, v = (
        rand(rng, (1, 2, L, 8), np.float64),
        rand(rng, (1, 2, S, 8), np.float64),
        rand(rng, (1, 2, S, 8), np.float64),
    )
    out = np.empty((1, 2, L, 8))
    dm, db = np.broadcast_to(np.zeros((1, 1, 1, 1)), (1, 2, L, S)), np.broadcast_to(np.zeros((1, 1)), (1, S))
    _backends.kernels(backend).attention(out, np.empty((1, 2, L)), q, k, v, 0.5, True, offset, 0, dm, False, db, False)
    mask = np.where(oracle.causal_mask(L, S, offset), 0.0, -np.inf)
    ref = oracle.softmax(oracle.attention_scores(q, k, 0.5, mask)) @ v
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ composed
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("rope", [None, {"base": 1000.0, "interleaved": True, "offset": 3}])
def test_self_attention(backend, dtype, causal, n_kv_heads, rope):
    rng = np.random.default_rng(16)
    B, N, D, H = 2, 17, 32, 4
    hkv = n_kv_heads or H
    x = rand(rng, (B, N, D), dtype)
    w_q, w_o = rand(rng, (D, D), dtype, 0.2), rand(rng, (D, D), dtype, 0.2)
    w_k, w_v = rand(rng, (D, hkv * 8), dtype, 0.2), rand(rng, (D, hkv * 8), dtype, 0.2)
    b_q, b_k, b_v, b_o = (
        rand(rng, (D,), dtype),
        rand(rng, (hkv * 8,), dtype),
        rand(rng, (hkv * 8,), dtype),
        rand(rng, (D,), dtype),
    )
    pad = np.zeros((B, N), dtype=bool)
    pad[1, -5:] = True
    kw = dict(n_heads=H, n_kv_heads=n_kv_heads, is_causal=causal, key_padding_mask=pad, rope=rope)
    got = fastattn.self_attention(x, w_q, w_k, w_v, w_o, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o, backend=backend, **kw)
    check_against_oracle(
        got,
        lambda *a: oracle.self_attention(*a[:5], b_q=a[5], b_k=a[6], b_v=a[7], b_o=a[8], **kw),
        (x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward(backend, dtype, causal):
    params = fastattn.init_params(101, 48, 6, max_positions=64, seed=3, dtype=dtype)
    ids = np.random.default_rng(17).integers(0, 101, size=(3, 29))
    pad = np.zeros((3, 29), dtype=bool)
    pad[0, 20:] = True
    got = fastattn.forward(ids, params, is_causal=causal, key_padding_mask=pad, backend=backend)
    params64 = fastattn.Params(
        **{
            f: (
                getattr(params, f).astype(np.float64)
                if isinstance(getattr(params, f), np.ndarray)
                else getattr(params, f)
            )
            for f in params.__dataclass_fields__
        }
    )
    ref = oracle.forward(ids, params64, is_causal=causal, key_padding_mask=pad)
    naive = oracle.forward(ids, params, is_causal=causal, key_padding_mask=pad)
    bound = 1e-10 if dtype == np.float64 else 4 * np.abs(naive - ref).max() + 1e-6
    assert np.abs(got - ref).max() <= bound * (1 + np.abs(ref).max())


# ------------------------------------------------------------------------------------------------ threads
def test_thread_count_does_not_change_results(compiled_backend):
    rng = np.random.default_rng(18)
    q, k, v = (rand(rng, (2, 3, 77, 32), np.float32) for _ in range(3))
    with fastattn.set_num_threads(1):
        one = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=compiled_backend)
        assert fastattn.get_num_threads() == 1
    with fastattn.set_num_threads(2):
        two = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=compiled_backend)
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ Cython tiles
CYTHON = pytest.mark.skipif("cython" not in fastattn.available_backends(), reason="the cython backend is not built")


@CYTHON
@pytest.mark.parametrize("tiles", ["micro", "blas", "loops"])
@pytest.mark.parametrize("bq,bk", [(7, 5), (13, 40), (32, 64)])
@pytest.mark.parametrize("E,Ev", [(1, 1), (5, 17), (16, 16), (65, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cython_tile_edges(tiles, bq, bk, E, Ev, dtype):
    """Each way of multiplying tiles with small odd tiles, so that every edge runs: rows left over after the micro-
    kernel's blocks of 6, columns left over after its vectors, head widths not a multiple of a vector, several key
    tiles with a causal band and a mask; and the stage kernels (scores, weighted_sum), which cut keys in chunks."""
    from fastattn.kernels import cython

    _backends.kernels("cython")
    _attention = cython.build("_attention")  # the build the kernels run (avx512, ...), not the baseline module

    rng = np.random.default_rng(E * 100 + Ev)
    B, Hq, Hkv, L, S = 1, 2, 1, 29, 71
    q, k, v = rand(rng, (B, Hq, L, E), dtype), rand(rng, (B, Hkv, S, E), dtype), rand(rng, (B, Hkv, S, Ev), dtype)
    mask = np.where(rng.random((B, Hq, L, S)) > 0.1, 0.0, -np.inf).astype(dtype)
    no_bias = np.broadcast_to(np.zeros((1, 1), dtype), (B, S))
    full = mask + np.where(oracle.causal_mask(L, S, 3), 0.0, -np.inf)

    def ref(q_, k_, v_):
        return oracle.softmax(oracle.attention_scores(q_, np.repeat(k_, Hq, axis=1), 0.5, full)) @ np.repeat(v_, 2, 1)

    previous = _attention._set_tile_products(tiles)
    min_work = _attention._set_blas_min_work(0)
    shape = _attention._set_tiles(tiles, bq, bk)
    try:
        assert _attention.tile_products().startswith(tiles)
        kern = _backends.kernels("cython")
        out = np.empty((B, Hq, L, Ev), dtype)
        kern.attention(out, np.empty((B, Hq, L), dtype), q, k, v, 0.5, True, 3, 0, mask, True, no_bias, False)
        check_against_oracle(out, ref, (q, k, v))
        s = np.empty((B, Hq, L, S), dtype)
        kern.scores(s, q, k, 0.5, False, 0, 0, mask, False, no_bias, False)
        check_against_oracle(s, lambda q_, k_: oracle.attention_scores(q_, np.repeat(k_, Hq, axis=1), 0.5), (q, k))
        p = oracle.softmax(s.astype(np.float64)).astype(dtype)
        kern.weighted_sum(out, p, v)
        check_against_oracle(out, lambda p_, v_: p_ @ np.repeat(v_, Hq, axis=1), (p, v))
    finally:
        _attention._set_tiles(tiles, *shape)
        _attention._set_blas_min_work(min_work)
        _attention._set_tile_products(previous)


@CYTHON
def test_cython_tile_products_setting():
    from fastattn.kernels import cython
    from fastattn.kernels.cython import _attention

    assert cython.tile_products().startswith("micro")  # the default
    with pytest.raises(ValueError, match=r"tile products must be one of loops, blas, micro, got 'gemm'"):
        _attention._set_tile_products("gemm")
    assert cython.tile_products().startswith("micro")
