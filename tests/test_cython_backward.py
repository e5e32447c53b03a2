"""The Cython kernels of the backward pass (and the forward's lse and window), called raw, against a literal
float64 NumPy reference written here from the math; results independent of the thread count and of the tile
products (micro-kernel, BLAS, loops)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_variant, check_against_oracle
from fastattn.kernels import cython as cy

pytestmark = pytest.mark.skipif(cy.UNAVAILABLE_REASON is not None, reason=str(cy.UNAVAILABLE_REASON))

TILES = ["micro", "blas", "loops"]


@pytest.fixture(params=TILES)
def tiles(request):
    if request.param == "micro":
        yield request.param
        return
    with backend_variant(f"cython/{request.param}"):
        yield request.param


# attention_backward runs in one pass (a work item per batch and key/value head) or in two (per key tile, then per
# query tile), chosen by the number of heads; each scheme also with small tiles, so that small shapes cross tiles.
SCHEMES = {
    "one-pass": (128, 128, 0),
    "two-pass": (128, 128, 1 << 40),
    "one-pass-16x24": (16, 24, 0),
    "two-pass-24x16": (24, 16, 1 << 40),
}


@pytest.fixture(params=list(SCHEMES))
def scheme(request):
    previous = cy._attention._set_backward_tiles(*SCHEMES[request.param])
    yield request.param
    cy._attention._set_backward_tiles(*previous)


@pytest.fixture
def threads():
    """Restores the thread count of the backend after a test that changes it."""
    before = cy.get_num_threads()
    yield
    cy.set_num_threads(before)


# --- the reference: literal math with the full L×S matrices, in the dtype of its inputs -------------------------


def _visible(L, S, causal, offset, window):
    i = np.arange(L)[:, None]  # (L, 1)
    j = np.arange(S)[None, :]  # (1, S)
    seen = np.ones((L, S), dtype=bool)
    if causal:
        seen &= j <= i + offset
        if window:
            seen &= j > i + offset - window
    return seen  # (L, S)


def ref_forward(q, k, v, scale, causal, offset, window, mask, key_bias):
    """(out, lse, p) of attention; q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)."""
    g = q.shape[1] // k.shape[1]
    kk = np.repeat(k, g, axis=1)  # (B, Hq, S, E)
    vv = np.repeat(v, g, axis=1)  # (B, Hq, S, Ev)
    s = scale * (q @ kk.transpose(0, 1, 3, 2))  # (B, Hq, L, S)
    if mask is not None:
        s = s + mask
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
    s = np.where(_visible(q.shape[2], k.shape[2], causal, offset, window), s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf, s.dtype)
    m = np.where(np.isfinite(m), m, 0)  # (B, Hq, L, 1): a row of -inf keeps 0
    e = np.exp(s - m)  # (B, Hq, L, S)
    total = e.sum(axis=-1, keepdims=True)  # (B, Hq, L, 1)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)  # (B, Hq, L, S), rows without keys: 0
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, m[..., 0] + np.log(total[..., 0]), -np.inf)  # (B, Hq, L)
    return p @ vv, lse, p  # (B, Hq, L, Ev), (B, Hq, L), (B, Hq, L, S)


def ref_backward(do, q, k, v, scale, causal, offset, window, mask, key_bias):
    """(dq, dk, dv) of sum(do ∘ attention(q, k, v)); GQA: a key/value head sums over its query heads."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    kk = np.repeat(k, g, axis=1)  # (B, Hq, S, E)
    vv = np.repeat(v, g, axis=1)  # (B, Hq, S, Ev)
    o, _, p = ref_forward(q, k, v, scale, causal, offset, window, mask, key_bias)
    dv = p.transpose(0, 1, 3, 2) @ do  # (B, Hq, S, Ev)
    dp = do @ vv.transpose(0, 1, 3, 2)  # (B, Hq, L, S)
    d = (do * o).sum(axis=-1, keepdims=True)  # (B, Hq, L, 1)
    ds = p * (dp - d) * scale  # (B, Hq, L, S)
    dq = ds @ kk  # (B, Hq, L, E)
    dk = ds.transpose(0, 1, 3, 2) @ q  # (B, Hq, S, E)
    return dq, dk.reshape(B, Hkv, g, S, E).sum(axis=2), dv.reshape(B, Hkv, g, S, Ev).sum(axis=2)


def test_reference_against_finite_differences():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 1, 5, 3))
    do = rng.standard_normal((1, 2, 3, 3))
    mask = np.where(rng.random((1, 2, 3, 5)) < 0.2, -np.inf, rng.standard_normal((1, 2, 3, 5)))
    args = (0.7, True, 2, 3, mask, rng.standard_normal((1, 5)))
    grads = ref_backward(do, q, k, v, *args)
    h = 1e-6
    for x, grad in zip((q, k, v), grads, strict=True):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + h
            plus = np.sum(do * ref_forward(q, k, v, *args)[0])
            x[idx] = old - h
            minus = np.sum(do * ref_forward(q, k, v, *args)[0])
            x[idx] = old
            numeric[idx] = (plus - minus) / (2 * h)
        assert np.max(np.abs(numeric - grad)) <= 1e-6 * (1 + np.max(np.abs(grad)))


# --- the cases ----------------------------------------------------------------------------------------------------

# (B, Hq, Hkv, L, S, E, Ev, causal, offset, window, mask, key_bias)
CASES = [
    (1, 1, 1, 1, 1, 1, 1, False, 0, 0, None, False),
    (2, 3, 3, 7, 5, 5, 3, False, 0, 0, None, False),
    (1, 2, 1, 130, 300, 16, 16, False, 0, 0, "additive", True),
    (1, 4, 2, 300, 130, 64, 64, True, 0, 0, None, False),  # causal top-left: S < L, rows without keys
    (1, 2, 2, 129, 257, 65, 63, True, 128, 0, None, False),  # causal bottom-right (KV cache)
    (2, 2, 1, 200, 200, 63, 129, True, 0, 37, None, False),  # window
    (1, 2, 2, 150, 290, 32, 8, True, 140, 130, "boolean", False),  # window, bottom-right, mask
    (1, 3, 1, 33, 260, 129, 1, False, 0, 0, "rows", True),  # fully masked rows
    (1, 2, 2, 5, 0, 4, 4, False, 0, 0, None, False),  # no keys at all
    # decoding (one query, few heads): the forward splits the keys into parts merged by log-sum-exp
    (1, 2, 1, 1, 3000, 64, 64, True, 2999, 0, "additive", True),
    (1, 1, 1, 1, 2100, 16, 8, True, 2099, 700, None, False),  # window: the first parts see no key
    (2, 1, 1, 1, 1500, 8, 8, False, 0, 0, "rows", False),  # a fully masked row
]


def _inputs(case, dtype, seed=0):
    B, Hq, Hkv, L, S, E, Ev, causal, offset, window, mask_kind, has_bias = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    do = rng.standard_normal((B, Hq, L, Ev)).astype(dtype)
    mask = None
    if mask_kind == "additive":
        mask = np.broadcast_to(rng.standard_normal((1, Hq, L, S)).astype(dtype), (B, Hq, L, S))
    elif mask_kind == "boolean":
        mask = np.where(rng.random((B, 1, L, S)) < 0.3, -np.inf, 0.0).astype(dtype)
        mask = np.broadcast_to(mask, (B, Hq, L, S))
    elif mask_kind == "rows":
        mask = np.zeros((B, Hq, L, S), dtype=dtype)
        mask[:, :, ::3] = -np.inf
    key_bias = rng.standard_normal((B, S)).astype(dtype) if has_bias else None
    scale = 1.0 / np.sqrt(E)
    return q, k, v, do, scale, bool(causal), offset, window, mask, key_bias


def _raw_masks(q, k, mask, key_bias):
    B, Hq, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    m = mask if mask is not None else np.broadcast_to(np.zeros((), q.dtype), (B, Hq, L, S))
    kb = key_bias if key_bias is not None else np.broadcast_to(np.zeros((), q.dtype), (B, S))
    return m, mask is not None, kb, key_bias is not None


def _forward(q, k, v, scale, causal, offset, window, mask, key_bias):
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    lse = np.empty(q.shape[:3], dtype=q.dtype)
    m, has_m, kb, has_kb = _raw_masks(q, k, mask, key_bias)
    cy.attention(out, lse, q, k, v, scale, causal, offset, window, m, has_m, kb, has_kb)
    return out, lse


def _backward(do, q, k, v, out, lse, scale, causal, offset, window, mask, key_bias):
    gq, gk, gv = np.full_like(q, np.nan), np.full_like(k, np.nan), np.full_like(v, np.nan)
    m, has_m, kb, has_kb = _raw_masks(q, k, mask, key_bias)
    cy.attention_backward(gq, gk, gv, do, q, k, v, out, lse, scale, causal, offset, window, m, has_m, kb, has_kb)
    return gq, gk, gv


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_forward_lse_and_window(case, dtype, tiles):
    q, k, v, do, scale, causal, offset, window, mask, key_bias = _inputs(case, dtype)
    out, lse = _forward(q, k, v, scale, causal, offset, window, mask, key_bias)
    args = (scale, causal, offset, window)
    for got, idx in ((out, 0), (lse, 1)):
        check_against_oracle(
            got, lambda q, k, v, m, kb, idx=idx: ref_forward(q, k, v, *args, m, kb)[idx], (q, k, v, mask, key_bias)
        )
    ref_lse = ref_forward(q, k, v, *args, mask, key_bias)[1]
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_attention_backward(case, dtype, tiles, scheme):
    q, k, v, do, scale, causal, offset, window, mask, key_bias = _inputs(case, dtype)
    args = (scale, causal, offset, window)
    out, lse = _forward(q, k, v, *args, mask, key_bias)
    grads = _backward(do, q, k, v, out, lse, *args, mask, key_bias)
    for idx, got in enumerate(grads):
        check_against_oracle(
            got,
            lambda do, q, k, v, m, kb, idx=idx: ref_backward(do, q, k, v, *args, m, kb)[idx],
            (do, q, k, v, mask, key_bias),
        )
    if (lse == -np.inf).any():  # rows with no key to attend to: no gradient
        assert np.all(grads[0][lse == -np.inf] == 0)


def test_scores_window():
    q, k, _, _, scale, causal, offset, window, mask, key_bias = _inputs(CASES[6], np.float64)
    s = np.empty(q.shape[:3] + (k.shape[2],))
    m, has_m, kb, has_kb = _raw_masks(q, k, mask, key_bias)
    cy.scores(s, q, k, scale, causal, offset, window, m, has_m, kb, has_kb)
    kk = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    ref = scale * (q @ kk.transpose(0, 1, 3, 2)) + mask
    ref = np.where(_visible(q.shape[2], k.shape[2], causal, offset, window), ref, -np.inf)
    assert np.array_equal(np.isneginf(s), np.isneginf(ref))
    np.testing.assert_allclose(s[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "case", [CASES[2], CASES[5], CASES[9], (3, 4, 2, 90, 300, 24, 40, True, 210, 0, "additive", True)]
)
def test_backward_same_for_any_thread_count(case, dtype, tiles, scheme, threads):
    q, k, v, do, scale, causal, offset, window, mask, key_bias = _inputs(case, dtype, seed=3)
    args = (scale, causal, offset, window)
    results = []
    for n in (1, 2, 3):
        cy.set_num_threads(n)
        out, lse = _forward(q, k, v, *args, mask, key_bias)
        results.append((out, lse) + _backward(do, q, k, v, out, lse, *args, mask, key_bias))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert np.array_equal(a, b, equal_nan=True)


def test_backward_leaves_inputs_alone():
    q, k, v, do, scale, causal, offset, window, mask, key_bias = _inputs(CASES[5], np.float32)
    out, lse = _forward(q, k, v, scale, causal, offset, window, mask, key_bias)
    before = [a.copy() for a in (do, q, k, v, out, lse)]
    _backward(do, q, k, v, out, lse, scale, causal, offset, window, mask, key_bias)
    for a, b in zip(before, (do, q, k, v, out, lse), strict=True):
        assert np.array_equal(a, b)


# --- stage kernels of the backward -------------------------------------------------------------------------------

STAGE_SHAPES = [(1, 1, 1, 1, 1, 1, 1), (2, 4, 2, 7, 300, 5, 3), (1, 3, 1, 600, 130, 65, 129), (1, 2, 2, 33, 5, 1, 64)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", STAGE_SHAPES)
def test_stage_backward_kernels(shape, dtype, tiles):
    B, Hq, Hkv, L, S, E, Ev = shape
    g = Hq // Hkv
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, Ev)).astype(dtype)
    s = rng.standard_normal((B, Hq, L, S)).astype(dtype)
    gs = np.where(rng.random((B, Hq, L, S)) < 0.2, 0, rng.standard_normal((B, Hq, L, S))).astype(dtype)
    do = rng.standard_normal((B, Hq, L, Ev)).astype(dtype)
    p = np.exp(s) / np.exp(s).sum(axis=-1, keepdims=True)  # (B, Hq, L, S) rows of a softmax
    scale = 0.37

    # softmax: grad_s = p ∘ (grad_p - rowsum(grad_p ∘ p))
    got = np.full((B * Hq * L, S), np.nan, dtype)
    cy.softmax_backward(got, gs.reshape(-1, S), p.reshape(-1, S))
    check_against_oracle(got.reshape(gs.shape), lambda gp, p: p * (gp - (gp * p).sum(axis=-1, keepdims=True)), (gs, p))

    # scores: grad_q = scale·grad_s @ k, grad_k = scale·Σ_group grad_sᵀ @ q
    gq, gk = np.full_like(q, np.nan), np.full_like(k, np.nan)
    cy.scores_backward(gq, gk, gs, q, k, scale)
    check_against_oracle(gq, lambda gs, k: scale * gs @ np.repeat(k, g, axis=1), (gs, k))
    check_against_oracle(
        gk, lambda gs, q: scale * (gs.transpose(0, 1, 3, 2) @ q).reshape(B, Hkv, g, S, E).sum(axis=2), (gs, q)
    )

    # weighted sum: grad_p = grad_out @ vᵀ, grad_v = Σ_group pᵀ @ grad_out
    gp, gv = np.full_like(p, np.nan), np.full_like(v, np.nan)
    cy.weighted_sum_backward(gp, gv, do, p, v)
    check_against_oracle(gp, lambda do, v: do @ np.repeat(v, g, axis=1).transpose(0, 1, 3, 2), (do, v))
    check_against_oracle(
        gv, lambda p, do: (p.transpose(0, 1, 3, 2) @ do).reshape(B, Hkv, g, S, Ev).sum(axis=2), (p, do)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stage_backward_same_for_any_thread_count(dtype, threads):
    rng = np.random.default_rng(2)
    B, Hq, Hkv, L, S, E = 2, 4, 2, 300, 700, 24
    q, k = rng.standard_normal((B, Hq, L, E)).astype(dtype), rng.standard_normal((B, Hkv, S, E)).astype(dtype)
    gs = rng.standard_normal((B, Hq, L, S)).astype(dtype)
    results = []
    for n in (1, 2, 3):
        cy.set_num_threads(n)
        gq, gk, gp, gv = np.empty_like(q), np.empty_like(k), np.empty_like(gs), np.empty_like(k)
        cy.scores_backward(gq, gk, gs, q, k, 0.5)
        cy.weighted_sum_backward(gp, gv, q, gs, k)
        results.append((gq, gk, gp, gv))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert np.array_equal(a, b)


# --- embedding kernels of the backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T, V, D", [(1, 1, 1), (0, 5, 3), (37, 11, 7), (2000, 300, 65)])
def test_gather_backward(T, V, D, dtype, threads):
    rng = np.random.default_rng(T)
    ids = rng.integers(0, V, size=T).astype(np.int64)
    ids[: T // 2] = ids[0] if T else 0  # a heavily repeated id
    grad_out = rng.standard_normal((T, D)).astype(dtype)
    one_hot = (ids[:, None] == np.arange(V)[None, :]).astype(np.float64)  # (T, V)
    results = []
    for n in (1, 2, 3):
        cy.set_num_threads(n)
        got = np.full((V, D), np.nan, dtype)
        cy.gather_backward(got, grad_out, ids)
        results.append(got)
        check_against_oracle(got, lambda go: one_hot.T @ go, (grad_out,))
    # each id's rows summed in increasing t in double, rounded once: exactly this sequential sum
    expected = np.zeros((V, D))
    for t in range(T):
        expected[ids[t]] += grad_out[t]
    expected = expected.astype(dtype)
    for got in results:
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, N, P, offset", [(1, 1, 1, 0), (3, 5, 9, 4), (2, 0, 3, 1), (4, 100, 130, 17)])
def test_add_positions_backward(B, N, P, offset, dtype):
    rng = np.random.default_rng(N)
    grad_out = rng.standard_normal((B, N, 6)).astype(dtype)
    got = np.full((P, 6), np.nan, dtype)
    cy.add_positions_backward(got, grad_out, offset)
    expected = np.zeros((P, 6), dtype)
    for b in range(B):  # increasing b, in the dtype
        expected[offset : offset + N] += grad_out[b]
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("L, S", [(1, 3000), (5, 300)])  # a decoding step split into parts, and a plain call
def test_forward_nan_row_stays_in_its_row(L, S):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((1, 3, L, 8), (1, 3, S, 8), (1, 3, S, 8)))
    q[0, 1, 0, 2] = np.nan
    out, lse = _forward(q, k, v, 0.3, False, 0, 0, None, None)
    assert np.all(np.isnan(out[0, 1, 0])) and np.isnan(lse[0, 1, 0])
    assert np.isfinite(lse).sum() == lse.size - 1 and np.isfinite(out).sum() == out.size - 8
