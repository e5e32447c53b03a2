"""Property-based tests (hypothesis) of every backend against the oracle, and the numerical extremes.

Hypothesis draws the shapes (batch, heads, GQA groups, lengths on both sides of the fused kernel's tiles, head
widths), the masks (none, causal, boolean, additive with ``-inf``, each broadcast in its own way), the dtypes, the
scales and the memory layouts; the arrays themselves come from a seeded NumPy generator (fast to build, and a
failure prints the seed). Every result is held to the tolerance rule of ``conftest.check_against_oracle``: float32
within 4x the naive float32 error of the float64 oracle, float64 within ~1e-10. Every call is also checked not to
touch its inputs.

Examples per backend: ``FASTATTN_HYPOTHESIS`` picks a profile: ``ci`` (the default, 750 per backend: 300 of
scaled_dot_product_attention, 100 each of embed, add_positions, apply_rope and self_attention, 50 of forward),
``dev`` (a tenth) or ``thorough`` (ten times ``ci``). ``pytest --hypothesis-show-statistics`` prints the counts.

Numerical extremes (explicit tests): logits of +-1e4, ``-inf`` in additive masks, rows with every key masked (zeros),
a NaN or inf in one query row (stays in that row: see ``scaled_dot_product_attention``'s docstring), float32 row
sums over 2^20 keys that need a wide accumulator (fused kernel, softmax and weighted-sum stages of the compiled
backends), subnormal and huge (a quarter of the largest float) values in V, zero, negative and tiny scales.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import COMPILED_VARIANTS, backend_variant, check_against_oracle, score_rounding_floor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import _backends, oracle


@pytest.fixture
def backend(backend_or_variant):
    """Every backend, and the Cython backend with each of its tile products (conftest.backend_variant)."""
    return backend_or_variant


PROFILES = {"dev": 0.1, "ci": 1.0, "thorough": 10.0}
_FACTOR = PROFILES[os.environ.get("FASTATTN_HYPOTHESIS", "ci")]


def examples(n: int) -> settings:
    """Settings for a property test that runs ``n`` examples per backend under the ``ci`` profile."""
    return settings(
        max_examples=max(5, int(n * _FACTOR)),
        deadline=None,  # the first example of a Numba backend compiles
        print_blob=True,
        # ``backend`` is a parametrised constant (a name), not state that an example could change
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)


def layout(rng, a: np.ndarray, how: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout: contiguous, a strided view, or Fortran order."""
    if how == "strided":
        big = np.empty(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)
        big[..., 1::2] = a
        return big[..., 1::2]
    if how == "fortran":
        return np.asfortranarray(a)
    return a


def untouched(arrays, copies):
    for a, c in zip(arrays, copies, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, c, err_msg="an input was modified")


def no_alias(out, arrays):
    for a in arrays:
        if isinstance(a, np.ndarray):
            assert not np.shares_memory(out, a), "the output aliases an input"


# ------------------------------------------------------------------------------------------------ attention
@st.composite
def attention_cases(draw):
    """Shapes, heads, mask and scale of one scaled_dot_product_attention call (arrays are built from ``seed``)."""
    # Lengths: mostly small; a quarter of the cases long enough to cross the compiled kernels' query and key tiles
    # (whatever their sizes: rows up to 270, keys up to 800), with fewer batch items and heads to stay cheap.
    long = draw(st.integers(0, 3)) == 0
    ndim = draw(st.sampled_from([2, 3, 4, 4, 4, 5] if not long else [2, 3, 4]))  # 2: (L, E); 3: heads; 4, 5: batch
    # "one-kv-head" and "one-q-head": a head dim of 1 broadcasts over the other's heads (PyTorch's broadcasting);
    # "gqa": enable_gqa=True, Hkv divides Hq
    heads = draw(st.sampled_from(["same", "same", "one-kv-head", "one-q-head", "gqa"])) if ndim >= 3 else "none"
    hkv = draw(st.integers(1, 3 if not long else 1))
    group = draw(st.integers(2, 4 if not long else 2)) if heads in ("gqa", "one-kv-head") else 1
    if heads == "one-kv-head":
        hkv = 1
    if heads == "one-q-head":
        hkv = draw(st.integers(2, 4 if not long else 2))
    hq = 1 if heads == "one-q-head" else hkv * group
    out_heads = max(hq, hkv)
    n_batch = 3 if not long else 2
    batch = tuple(draw(st.lists(st.integers(1, n_batch), min_size=ndim - 3, max_size=ndim - 3))) if ndim > 3 else ()
    # key/value batch dims may be 1 where the query's are not (broadcast), and the reverse
    kv_batch = tuple(draw(st.sampled_from([n, 1])) for n in batch)
    q_batch = tuple(n if kb != 1 else draw(st.sampled_from([n, 1])) for n, kb in zip(batch, kv_batch, strict=True))
    L = draw(st.integers(1, 20) if not long else st.integers(1, 270))
    S = draw(st.integers(1, 24) if not long else st.integers(1, 800))
    E = draw(st.integers(1, 40))
    Ev = draw(st.integers(1, 24))
    mask = draw(st.sampled_from(["none", "none", "causal", "bool", "float", "float-inf"]))
    batch = tuple(max(a, b) for a, b in zip(q_batch, kv_batch, strict=True))  # what they broadcast to
    lead = (batch + (out_heads,)) if ndim >= 3 else ()
    full = lead + (L, S)
    mshape = tuple(draw(st.sampled_from([n, 1])) for n in full)
    mshape = mshape[draw(st.integers(0, max(0, len(mshape) - 2))) :]  # drop some leading dims: they broadcast
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False), st.sampled_from([1e-3, 0.25, 8.0])))
    return dict(
        heads=heads,
        hq=hq,
        hkv=hkv,
        q_batch=q_batch,
        kv_batch=kv_batch,
        ndim=ndim,
        L=L,
        S=S,
        E=E,
        Ev=Ev,
        mask=mask,
        mshape=mshape,
        scale=scale,
        magnitude=draw(st.sampled_from([0.1, 1.0, 1.0, 10.0, 30.0])),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "strided", "fortran"])),
        dtype=draw(DTYPES),
        seed=draw(SEEDS),
    )


def build_attention(c):
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]

    def arr(batch, h, n, e, mag):
        shape = (batch + (h,) if c["ndim"] >= 3 else ()) + (n, e)
        return (rng.standard_normal(shape) * mag).astype(dt)

    q = arr(c["q_batch"], c["hq"], c["L"], c["E"], c["magnitude"])
    k = arr(c["kv_batch"], c["hkv"], c["S"], c["E"], c["magnitude"])
    v = arr(c["kv_batch"], c["hkv"], c["S"], c["Ev"], 1.0)
    q, k, v = (layout(rng, a, c["layout"]) for a in (q, k, v))
    mask = None
    if c["mask"] == "bool":
        mask = rng.random(c["mshape"]) > 0.3
    elif c["mask"] in ("float", "float-inf"):
        mask = rng.standard_normal(c["mshape"]).astype(dt)
        if c["mask"] == "float-inf":
            mask[rng.random(c["mshape"]) > 0.6] = -np.inf
    return q, k, v, mask


@given(c=attention_cases())
@examples(300)
def test_sdpa_matches_oracle(backend, c):
    q, k, v, mask = build_attention(c)
    causal = c["mask"] == "causal"
    gqa = c["heads"] == "gqa"
    inputs = (q, k, v, mask)
    copies = [None if a is None else a.copy() for a in inputs]
    got = fastattn.scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, scale=c["scale"], enable_gqa=gqa, backend=backend
    )
    untouched(inputs, copies)
    no_alias(got, inputs)
    assert got.dtype == c["dtype"]

    def ref(q_, k_, v_, m_):
        return oracle.scaled_dot_product_attention(
            q_, k_, v_, m_, is_causal=causal, scale=c["scale"], enable_gqa=gqa and c["ndim"] >= 3
        )

    floor = score_rounding_floor(q, k, v, c["scale"])
    inputs = (np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), mask)
    check_against_oracle(got, ref, inputs, floor=floor)


# ------------------------------------------------------------------------------------------------ embedding, positions
@given(
    dtype=DTYPES,
    seed=SEEDS,
    vocab=st.integers(1, 300),
    d=st.integers(0, 70),
    ids_shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    strided=st.booleans(),
)
@examples(100)
def test_embed_is_an_exact_gather(backend, dtype, seed, vocab, d, ids_shape, strided):
    rng = np.random.default_rng(seed)
    table = layout(rng, rng.standard_normal((vocab, d)).astype(dtype), "strided" if strided else "contiguous")
    ids = rng.integers(0, vocab, size=tuple(ids_shape))
    copies = (table.copy(), ids.copy())
    got = fastattn.embed(ids, table, backend=backend)
    untouched((table, ids), copies)
    no_alias(got, (table,))
    np.testing.assert_array_equal(got, oracle.embed(ids, table))


@given(
    dtype=DTYPES,
    seed=SEEDS,
    lead=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(1, 40),
    d=st.integers(1, 40),
    offset=st.integers(0, 50),
    extra=st.integers(0, 5),
)
@examples(100)
def test_add_positions_matches_oracle(backend, dtype, seed, lead, n, d, offset, extra):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n, d)).astype(dtype)
    pe = rng.standard_normal((offset + n + extra, d)).astype(dtype)
    copies = (x.copy(), pe.copy())
    got = fastattn.add_positions(x, pe, offset=offset, backend=backend)
    untouched((x, pe), copies)
    no_alias(got, (x, pe))
    check_against_oracle(got, lambda a, p: oracle.add_positions(a, p, offset), (x, pe))


@given(
    dtype=DTYPES,
    seed=SEEDS,
    lead=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(1, 40),
    half=st.integers(1, 40),
    offset=st.one_of(st.integers(0, 100), st.integers(0, 2**40)),
    base=st.sampled_from([10.0, 500.0, 10000.0, 1e6]),
    interleaved=st.booleans(),
    strided=st.booleans(),
)
@examples(100)
def test_apply_rope_matches_oracle(backend, dtype, seed, lead, n, half, offset, base, interleaved, strided):
    rng = np.random.default_rng(seed)
    x = layout(rng, rng.standard_normal((*lead, n, 2 * half)).astype(dtype), "strided" if strided else "contiguous")
    copy = x.copy()
    got = fastattn.apply_rope(x, offset=offset, base=base, interleaved=interleaved, backend=backend)
    untouched((x,), (copy,))
    no_alias(got, (x,))
    check_against_oracle(got, lambda a: oracle.apply_rope(a, offset, base, interleaved), (x,))


# ------------------------------------------------------------------------------------------------ composed
@st.composite
def self_attention_cases(draw):
    hkv = draw(st.integers(1, 3))
    h = hkv * draw(st.integers(1, 3))
    d = 2 * draw(st.integers(1, 6))
    return dict(
        B=draw(st.integers(1, 3)),
        N=draw(st.one_of(st.integers(1, 20), st.integers(60, 80))),
        D=draw(st.integers(1, 24)),
        h=h,
        hkv=hkv,
        d=d,
        dv=draw(st.integers(1, 9)),
        gqa_arg=draw(st.booleans()),
        w_o=draw(st.booleans()),
        biases=draw(st.booleans()),
        causal=draw(st.booleans()),
        padding=draw(st.sampled_from([None, "bool", "float", "1d"])),
        rope=draw(st.sampled_from([None, True, {"base": 500.0, "interleaved": True, "offset": 7}])),
        dtype=draw(DTYPES),
        seed=draw(SEEDS),
    )


@given(c=self_attention_cases())
@examples(100)
def test_self_attention_matches_oracle(backend, c):
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    B, N, D, h, hkv, d, dv = (c[k] for k in ("B", "N", "D", "h", "hkv", "d", "dv"))

    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dt)

    x = r(B, N, D)
    w_q, w_k, w_v = r(D, h * d, s=0.3), r(D, hkv * d, s=0.3), r(D, hkv * dv, s=0.3)
    w_o = r(h * dv, D, s=0.3) if c["w_o"] else None
    b = dict(b_q=r(h * d), b_k=r(hkv * d), b_v=r(hkv * dv), b_o=r(D if c["w_o"] else h * dv)) if c["biases"] else {}
    pad = None
    if c["padding"] == "bool":
        pad = rng.random((B, N)) > 0.7
    elif c["padding"] == "float":
        pad = r(B, N)
    elif c["padding"] == "1d":
        pad = rng.random(N) > 0.7
    kw = dict(
        n_heads=h,
        n_kv_heads=hkv if (hkv != h or c["gqa_arg"]) else None,
        is_causal=c["causal"],
        key_padding_mask=pad,
        rope=c["rope"],
    )
    inputs = (x, w_q, w_k, w_v, w_o, *b.values(), pad)
    copies = [None if a is None else a.copy() for a in inputs]
    got = fastattn.self_attention(x, w_q, w_k, w_v, w_o, backend=backend, **b, **kw)
    untouched(inputs, copies)
    no_alias(got, inputs)
    names = list(b)
    oracle_rope = {} if c["rope"] is True else c["rope"]  # True means the defaults

    def ref(x_, wq_, wk_, wv_, wo_, *bs):
        pad_ = np.broadcast_to(pad, (B, N)) if pad is not None else None
        return oracle.self_attention(
            x_,
            wq_,
            wk_,
            wv_,
            wo_,
            **dict(zip(names, bs, strict=True)),
            **{**kw, "key_padding_mask": pad_, "rope": oracle_rope},
        )

    check_against_oracle(got, ref, (x, w_q, w_k, w_v, w_o, *b.values()))


@given(
    dtype=DTYPES,
    seed=SEEDS,
    vocab=st.integers(1, 60),
    heads=st.integers(1, 4),
    d=st.integers(1, 8),
    B=st.integers(1, 3),
    N=st.integers(1, 24),
    causal=st.booleans(),
    padded=st.booleans(),
)
@examples(50)
def test_forward_matches_oracle(backend, dtype, seed, vocab, heads, d, B, N, causal, padded):
    params = fastattn.init_params(vocab, heads * d, heads, max_positions=N + 3, seed=seed % 1000, dtype=dtype)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, N))
    pad = (rng.random((B, N)) > 0.7) if padded else None
    got = fastattn.forward(ids, params, is_causal=causal, key_padding_mask=pad, backend=backend)
    fields = [f for f in params.__dataclass_fields__ if isinstance(getattr(params, f), np.ndarray)]

    def ref(*arrays):
        p = fastattn.Params(**{**params.__dict__, **dict(zip(fields, arrays, strict=True))})
        return oracle.forward(ids, p, is_causal=causal, key_padding_mask=pad)

    check_against_oracle(got, ref, tuple(getattr(params, f) for f in fields))


# ------------------------------------------------------------------------------------------------ numerical extremes
DT = [np.float32, np.float64]


def sdpa(q, k, v, mask=None, **kw):
    return fastattn.scaled_dot_product_attention(q, k, v, mask, **kw)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("causal", [False, True])
def test_logits_of_1e4_do_not_overflow(backend, dtype, causal):
    """Scores of exactly +-1e4, 9999, 0.5 (integers times one-hot rows: exact in float32 too) and their mixtures."""
    a = np.array([1e4, -1e4, 1.0, 0.0, 5e3, -5e3, 1e4], dtype)  # query feature 0 (L = 7)
    c = np.array([1.0, -1.0, 0.9999, 0.5, 1.0, -1.0, 0.0, 0.25, 1.0], dtype)  # key feature 0 (S = 9)
    q = np.zeros((2, 7, 3), dtype)
    k = np.zeros((2, 9, 3), dtype)
    q[:, :, 0], k[:, :, 0] = a, c
    q[1] *= -1  # the second batch item flips every sign
    v = np.random.default_rng(0).standard_normal((2, 9, 5)).astype(dtype)
    got = sdpa(q, k, v, is_causal=causal, scale=1.0, backend=backend)
    assert np.all(np.isfinite(got))
    check_against_oracle(
        got, lambda *t: oracle.scaled_dot_product_attention(*t, is_causal=causal, scale=1.0), (q, k, v)
    )
    # the same logits through an additive mask: scores 0 + mask
    mask = (a[:, None] * c[None, :]).astype(dtype)
    got = sdpa(np.zeros_like(q), k, v, mask, backend=backend)
    assert np.all(np.isfinite(got))
    check_against_oracle(got, lambda *t: oracle.scaled_dot_product_attention(*t), (np.zeros_like(q), k, v, mask))


@pytest.mark.parametrize("dtype", DT)
def test_minus_inf_mask_entries_and_fully_masked_rows(backend, dtype):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, n, 8)).astype(dtype) for n in (37, 530, 530))
    v = v[..., :6]
    mask = rng.standard_normal((2, 1, 37, 530)).astype(dtype)
    mask[rng.random(mask.shape) > 0.5] = -np.inf
    mask[0, 0, 5] = -np.inf  # every key hidden from query 5 of batch item 0, in all heads
    mask[1, 0, 36, :] = -np.inf
    mask[1, 0, 36, 529] = 0.0  # only the very last key left (the last key tile)
    got = sdpa(q, k, v, mask, backend=backend)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[0, :, 5], 0.0)
    np.testing.assert_allclose(got[1, :, 36], v[1, :, 529], rtol=1e-6)
    check_against_oracle(got, lambda *t: oracle.scaled_dot_product_attention(*t), (q, k, v, mask))
    # a large but finite negative mask is not "masked": softmax ignores the shift (up to float32's rounding of it)
    shifted = sdpa(q, k, v, np.full((37, 530), -1e4, dtype), backend=backend)
    np.testing.assert_allclose(shifted, sdpa(q, k, v, backend=backend), atol=1e-2 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DT)
def test_fully_padded_sequence_gives_zeros(backend, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 9, 16)).astype(dtype)
    w = [rng.standard_normal((16, 16)).astype(dtype) * 0.3 for _ in range(3)]
    pad = np.zeros((3, 9), bool)
    pad[1] = True  # batch item 1 is all padding
    pad[2, 4:] = True
    got = fastattn.self_attention(x, *w, n_heads=4, key_padding_mask=pad, backend=backend)
    np.testing.assert_array_equal(got[1], 0.0)
    check_against_oracle(got, lambda *a: oracle.self_attention(*a, n_heads=4, key_padding_mask=pad), (x, *w))
    # causal and padding together leave query 0 of item 2 nothing when its only visible key is padded
    pad[2, 0] = True
    got = fastattn.self_attention(x, *w, n_heads=4, is_causal=True, key_padding_mask=pad, backend=backend)
    np.testing.assert_array_equal(got[2, 0], 0.0)
    assert np.all(np.isfinite(got))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the numpy backend says so
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("L", [5, 130])
def test_nan_in_one_query_row_stays_in_that_row(backend, dtype, causal, bad, L):
    """A NaN (or inf) anywhere in query row i makes output row i NaN, and changes no other row by a single bit."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, L, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, 600, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, 600, 3)).astype(dtype)
    clean = sdpa(q, k, v, is_causal=causal, enable_gqa=True, backend=backend)
    poisoned = q.copy()
    poisoned[1, 3, L // 2, 2] = bad
    got = sdpa(poisoned, k, v, is_causal=causal, enable_gqa=True, backend=backend)
    assert np.all(np.isnan(got[1, 3, L // 2]))
    others = np.ones(got.shape[:3], bool)
    others[1, 3, L // 2] = False
    np.testing.assert_array_equal(got[others], clean[others])


def test_nan_in_one_softmax_row_stays_in_that_row(backend):
    s = np.random.default_rng(4).standard_normal((6, 40))
    s[2, 7] = np.nan
    s[4] = -np.inf  # and a fully masked row beside it
    out = np.empty_like(s)
    _backends.kernels(backend).softmax(out, s)
    assert np.all(np.isnan(out[2]))
    np.testing.assert_array_equal(out[4], 0.0)
    rows = [0, 1, 3, 5]
    np.testing.assert_allclose(out[rows], oracle.softmax(s[rows]), rtol=1e-12)


WIDE = 1 << 20  # keys in one row: one of weight 1 and 2^20 - 1 of weight 5.6e-8 (< 2^-24, so 1 + w == 1 in float32)
WIDE_BOUND = 1e-5  # relative; a float32 running sum is off by 0.4% to 6% here, a float64 one by ~1e-7


def wide_row(where):
    """Scores (one 0, the rest -16.7), values (0 for the dominant key, 1 for the others) and the exact output: the
    tiny keys' share of the weight. The naive float32 oracle is itself off by ~4e-4 here, so the compiled kernels
    are held to an absolute bound rather than to the naive error."""
    s = np.full(WIDE, -16.7, np.float32)
    v = np.ones(WIDE, np.float32)
    j = 0 if where == "first" else WIDE - 1
    s[j], v[j] = 0.0, 0.0
    w = np.exp(s.astype(np.float64))
    return s, v, j, float(w @ v / w.sum())


@pytest.mark.parametrize("variant", COMPILED_VARIANTS)
@pytest.mark.parametrize("where", ["first", "last"])
def test_float32_fused_row_sums_use_a_wide_accumulator(variant, where):
    s, v, _, share = wide_row(where)
    q = np.ones((1, 1, 1, 1), np.float32)
    with backend_variant(variant) as backend_:
        got = sdpa(q, s.reshape(1, 1, WIDE, 1), v.reshape(1, 1, WIDE, 1), scale=1.0, backend=backend_).item()
    assert abs(got - share) <= WIDE_BOUND * share, f"relative error {abs(got - share) / share:.2e}"


@pytest.mark.parametrize("variant", COMPILED_VARIANTS)
@pytest.mark.parametrize("where", ["first", "last"])
def test_float32_softmax_row_sum_uses_a_wide_accumulator(variant, where):
    s, _, j, share = wide_row(where)
    p = np.empty((1, WIDE), np.float32)
    with backend_variant(variant) as backend_:
        _backends.kernels(backend_).softmax(p, s[None])
    tiny = float(p[0, 1 if j == 0 else 0]) * (WIDE - 1)  # the tiny keys' share of the weight
    assert abs(tiny - share) <= WIDE_BOUND * share, f"relative error {abs(tiny - share) / share:.2e}"


@pytest.mark.parametrize("variant", COMPILED_VARIANTS)
@pytest.mark.parametrize("where", ["first", "last"])
def test_float32_weighted_sum_uses_a_wide_accumulator(variant, where):
    s, v, _, share = wide_row(where)
    w = np.exp(s.astype(np.float64))
    p = (w / w.sum()).astype(np.float32).reshape(1, 1, 1, WIDE)  # the exact weights, rounded to float32 once
    out = np.empty((1, 1, 1, 1), np.float32)
    with backend_variant(variant) as backend_:
        _backends.kernels(backend_).weighted_sum(out, p, v.reshape(1, 1, WIDE, 1))
    assert abs(out.item() - share) <= WIDE_BOUND * share, f"relative error {abs(out.item() - share) / share:.2e}"


@pytest.mark.parametrize("dtype", DT)
def test_subnormal_values_in_v(backend, dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((2, 70, 8)).astype(dtype) for _ in range(2))
    v = (rng.integers(-1000, 1000, (2, 70, 4)) * tiny).astype(dtype)  # every value subnormal (or zero)
    got = sdpa(q, k, v, is_causal=True, backend=backend)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got) <= np.abs(v).max())  # a convex combination stays within the values' range
    v[:, ::2] = rng.standard_normal((2, 35, 4))  # subnormals beside normal values
    got = sdpa(q, k, v, is_causal=True, backend=backend)
    check_against_oracle(got, lambda *t: oracle.scaled_dot_product_attention(*t, is_causal=True), (q, k, v))


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("S", [16, 600])
def test_huge_values_in_v(backend, dtype, S):
    """|V| up to a quarter of the largest float: a weighted average of them is finite; it must not overflow on the
    way (a flash kernel that sums p·v before dividing by the row sum needs care here)."""
    huge = np.finfo(dtype).max / 4
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 9, 4)).astype(dtype) * 0.01  # nearly uniform weights
    k = rng.standard_normal((1, 2, S, 4)).astype(dtype)
    v = np.where(rng.random((1, 2, S, 3)) > 0.5, huge, -huge).astype(dtype)
    v[..., 0] = huge
    got = sdpa(q, k, v, backend=backend)
    assert np.all(np.isfinite(got)), "overflow with huge values in V"
    np.testing.assert_allclose(got[..., 0], huge, rtol=1e-5)
    assert np.all(np.abs(got) <= huge * (1 + 1e-5))  # a weighted average, up to rounding
    ref = oracle.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(got, ref, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=huge * 1e-5)


@pytest.mark.parametrize("dtype", DT)
def test_scale_extremes(backend, dtype):
    """A zero scale gives uniform weights; a negative one flips the ranking; a tiny one is nearly uniform."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for shape in ((2, 11, 8), (2, 13, 8), (2, 13, 3)))
    got = sdpa(q, k, v, scale=0.0, backend=backend)
    np.testing.assert_allclose(got, np.broadcast_to(v.mean(1, keepdims=True), got.shape), rtol=1e-5, atol=1e-6)
    for scale in (-1.5, 1e-30):
        got = sdpa(q, k, v, scale=scale, backend=backend)
        check_against_oracle(got, lambda *t, s=scale: oracle.scaled_dot_product_attention(*t, scale=s), (q, k, v))
