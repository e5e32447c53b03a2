"""Property-based tests (hypothesis) of every backward kernel of every backend that has them, against the oracle.

The backends are those of the ``backward_backend`` fixture (tests/conftest.py). Drawn: shapes (L != S, N = 1, odd
sizes, head widths 1 to 129), causal with both alignments (``is_causal``: top-left; the kernels' ``causal_offset``,
e.g. S - L: bottom-right) and sliding windows, boolean and additive masks with fully masked rows (zero gradient),
key biases, GQA, broadcast leading axes (gradients summed back over them), non-contiguous inputs, float32 and
float64. Tolerances: ``conftest.check_against_oracle`` (float32 within 4x the naive float32 computation's error
against float64, or a floor for what float32 scores cannot avoid; float64 about 1e-10).

Examples per backend under the default ``ci`` profile (``FASTATTN_HYPOTHESIS``, as test_properties.py): 200 of
scaled_dot_product_attention_backward, 150 of the raw attention_backward kernel, 50 each of the three stage
backward kernels, 60 of embed_backward, 40 of add_positions_backward and apply_rope_backward, 20 of
self_attention_backward: 660.
"""

from __future__ import annotations

import numpy as np
from conftest import check_against_oracle, score_rounding_floor
from hypothesis import example, given
from hypothesis import strategies as st
from test_properties import DTYPES, SEEDS, attention_cases, build_attention, examples, layout, untouched

import fastattn
from fastattn import _backends, oracle

EPS32 = float(np.finfo(np.float32).eps)


def gradient_floor(ref_grad, g, q, k, v, scale):
    """What a float32 gradient of the flash recipe cannot avoid (see conftest.score_rounding_floor for the forward):

    - scores stored in float32 move each probability by eps·|s| relative, and every gradient by about that much of
      its own size;
    - dS = P (dP - D) subtracts D = rowsum(dO ∘ out) from dP = dO·v, both up to ‖dO‖·max‖v‖ (Cauchy-Schwarz), each
      rounded to eps of that: dQ = scale·dS K and dK = scale·dSᵀ Q (P sums to 1 over a row) inherit
      eps·|scale|·‖dO‖·‖v‖·max(‖q‖, ‖k‖), even where the exact gradient is 0 (one key: dS = 0).

    Norms are row norms (largest row), so nothing of size L x S is built."""
    q, k, v, g = (np.asarray(a, dtype=np.float64) for a in (q, k, v, g))
    if min(a.size for a in (q, k, v, g)) == 0:
        return 0.0
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else abs(scale)
    rel = score_rounding_floor(q, k, np.ones((1,)), scale)  # eps · max|s|
    norm = [float(np.linalg.norm(a, axis=-1).max()) for a in (q, k, v, g)]
    cancel = EPS32 * scale * norm[3] * norm[2] * max(norm[0], norm[1])
    return (rel + EPS32) * float(np.max(np.abs(ref_grad), initial=0.0)) + cancel


@st.composite
def backward_cases(draw):
    """attention_cases, with wide heads (E, Ev up to 129) in a fifth of the short cases, and windows when causal."""
    c = draw(attention_cases())
    if c["L"] <= 20 and c["S"] <= 24 and draw(st.integers(0, 4)) == 0:
        c["E"] = draw(st.integers(1, 129))
        c["Ev"] = draw(st.integers(1, 129))
    c["window"] = draw(st.sampled_from([None, None, 1, 3, 17])) if c["mask"] == "causal" else None
    return c


# Found by a random run: near-tied scores of ~2450 (inputs of magnitude 30, E = 2), where the forward's and the
# backward's float32 scores differed by an ulp; dQ was 3.5% past the bound (test_backward.py: the forward's
# rounding, test_sdpa_backward_from_any_forward).
REGRESSION = dict(heads="gqa", hq=2, hkv=1, q_batch=(), kv_batch=(), ndim=3, L=1, S=343, E=2, Ev=9, mask="float",
                  mshape=(2, 1, 343), scale=None, magnitude=30.0, layout="contiguous", dtype=np.float32, seed=1,
                  window=None)  # fmt: skip


@given(c=backward_cases())
@example(c=REGRESSION)
@examples(200)
def test_sdpa_backward_matches_oracle(backward_backend, c):
    q, k, v, mask = build_attention(c)
    causal = c["mask"] == "causal"
    gqa = c["heads"] == "gqa"
    kw = dict(is_causal=causal, scale=c["scale"], enable_gqa=gqa, window=c["window"])
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, backend=backward_backend, **kw)
    rng = np.random.default_rng(c["seed"] + 1)
    g = layout(rng, rng.standard_normal(out.shape).astype(c["dtype"]), c["layout"])
    inputs = (g, q, k, v, out, lse, mask)
    copies = [None if a is None else a.copy() for a in inputs]
    grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, mask, backend=backward_backend, **kw)
    untouched(inputs, copies)
    okw = dict(kw, enable_gqa=gqa and c["ndim"] >= 3)
    contiguous = tuple(np.ascontiguousarray(a) for a in (g, q, k, v))
    for i, grad in enumerate(grads):
        assert grad.shape == (q, k, v)[i].shape and grad.dtype == c["dtype"]

        def ref(g_, q_, k_, v_, m_, i=i):
            return oracle.scaled_dot_product_attention_backward(g_, q_, k_, v_, m_, **okw)[i]

        floor = 0.0
        if c["dtype"] == np.float32:
            ref64 = ref(*(a.astype(np.float64) for a in contiguous), mask)
            floor = gradient_floor(ref64, g, q, k, v, c["scale"])
        check_against_oracle(grad, ref, contiguous + (mask,), floor=floor)


@given(
    dtype=DTYPES,
    seed=SEEDS,
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    L=st.integers(1, 140),
    S=st.integers(1, 300),
    E=st.sampled_from([1, 3, 8, 16, 33, 64, 129]),
    Ev=st.sampled_from([1, 5, 16, 64]),
    align=st.sampled_from(["none", "top-left", "bottom-right", "any"]),
    window=st.sampled_from([0, 0, 1, 7, 100]),
    mask=st.sampled_from(["none", "float-inf", "bool-rows"]),
    bias=st.booleans(),
)
@examples(150)
def test_attention_backward_kernel_matches_oracle(backward_backend, dtype, seed, batch, hkv, group, L, S, E, Ev, align,
                                                  window, mask, bias):  # fmt: skip
    """The raw kernel: causal_offset 0 (top-left), S - L (bottom-right, a KV cache) or any, windows, a broadcast
    mask (some rows fully masked), a key bias; GQA against the oracle with the additive mask built literally."""
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = rng.standard_normal((batch, hq, L, E)).astype(dtype)
    k = rng.standard_normal((batch, hkv, S, E)).astype(dtype)
    v = rng.standard_normal((batch, hkv, S, Ev)).astype(dtype)
    causal = align != "none"
    offset = {"none": 0, "top-left": 0, "bottom-right": S - L, "any": int(rng.integers(-L, S + 1))}[align]
    window = window if causal else 0
    add = np.zeros((1, 1, L, S), dtype)
    has_mask = mask != "none"
    m = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype), (batch, hq, L, S))
    if has_mask:
        raw = np.where(rng.random((1, hq, L, S)) > 0.3, rng.standard_normal((1, hq, L, S)), -np.inf).astype(dtype)
        if mask == "bool-rows":
            raw = np.where(rng.random((1, hq, L, S)) > 0.3, 0.0, -np.inf).astype(dtype)
        raw[:, :, rng.integers(0, L)] = -np.inf  # a fully masked row
        m = np.broadcast_to(raw, (batch, hq, L, S))
        add = add + raw
    kb = np.broadcast_to(np.zeros((1, 1), dtype), (batch, S))
    if bias:
        kb = rng.standard_normal((batch, S)).astype(dtype)
        add = add + kb[:, None, None, :]
    if causal:
        add = add + np.where(oracle.causal_mask(L, S, offset, window), 0.0, -np.inf).astype(dtype)
    kern = _backends.kernels(backward_backend)
    out = np.empty((batch, hq, L, Ev), dtype)
    lse = np.empty((batch, hq, L), dtype)
    kern.attention(out, lse, q, k, v, 0.3, causal, offset, window, m, has_mask, kb, bias)
    g = rng.standard_normal(out.shape).astype(dtype)
    gq, gk, gv = np.full(q.shape, np.nan, dtype), np.full(k.shape, np.nan, dtype), np.full(v.shape, np.nan, dtype)
    kern.attention_backward(gq, gk, gv, g, q, k, v, out, lse, 0.3, causal, offset, window, m, has_mask, kb, bias)
    seen = np.isfinite(lse)
    np.testing.assert_array_equal(gq[~seen], 0.0)  # rows with no key: zero gradient
    for i, grad in enumerate((gq, gk, gv)):

        def ref(g_, q_, k_, v_, add_, i=i):
            return oracle.scaled_dot_product_attention_backward(g_, q_, k_, v_, add_, scale=0.3, enable_gqa=True)[i]

        floor = 0.0
        if dtype == np.float32:
            floor = gradient_floor(ref(*(a.astype(np.float64) for a in (g, q, k, v, add))), g, q, k, v, 0.3)
        check_against_oracle(grad, ref, (g, q, k, v, add), floor=floor)


# ------------------------------------------------------------------------------------------------ stage kernels
@given(dtype=DTYPES, seed=SEEDS, R=st.integers(1, 40), S=st.integers(1, 70), masked=st.booleans())
@examples(50)
def test_softmax_backward_kernel(backward_backend, dtype, seed, R, S, masked):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((R, S)) * 3
    if masked:
        s[rng.random((R, S)) > 0.5] = -np.inf
        s[0] = -np.inf  # a fully masked row: p = 0, gradient 0
    p = oracle.softmax(s).astype(dtype)
    gp = rng.standard_normal((R, S)).astype(dtype)
    got = np.full((R, S), np.nan, dtype)
    _backends.kernels(backward_backend).softmax_backward(got, gp, p)
    check_against_oracle(got, oracle.softmax_backward, (gp, p))


@given(dtype=DTYPES, seed=SEEDS, B=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3),
       L=st.integers(1, 30), S=st.integers(1, 40), E=st.integers(1, 129))  # fmt: skip
@examples(50)
def test_scores_backward_kernel(backward_backend, dtype, seed, B, hkv, group, L, S, E):
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q, k = rng.standard_normal((B, hq, L, E)).astype(dtype), rng.standard_normal((B, hkv, S, E)).astype(dtype)
    gs = rng.standard_normal((B, hq, L, S)).astype(dtype)
    gq, gk = np.full(q.shape, np.nan, dtype), np.full(k.shape, np.nan, dtype)
    _backends.kernels(backward_backend).scores_backward(gq, gk, gs, q, k, 0.7)

    def ref(gs_, q_, k_, i):
        grads = oracle.attention_scores_backward(gs_, q_, np.repeat(k_, group, axis=1), 0.7)
        return grads[0] if i == 0 else grads[1].reshape(B, hkv, group, S, E).sum(axis=2)

    check_against_oracle(gq, lambda *a: ref(*a, 0), (gs, q, k))
    check_against_oracle(gk, lambda *a: ref(*a, 1), (gs, q, k))


@given(dtype=DTYPES, seed=SEEDS, B=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3),
       L=st.integers(1, 30), S=st.integers(1, 40), Ev=st.integers(1, 129))  # fmt: skip
@examples(50)
def test_weighted_sum_backward_kernel(backward_backend, dtype, seed, B, hkv, group, L, S, Ev):
    rng = np.random.default_rng(seed)
    hq = hkv * group
    p = oracle.softmax(rng.standard_normal((B, hq, L, S))).astype(dtype)
    v, go = rng.standard_normal((B, hkv, S, Ev)).astype(dtype), rng.standard_normal((B, hq, L, Ev)).astype(dtype)
    gp, gv = np.full(p.shape, np.nan, dtype), np.full(v.shape, np.nan, dtype)
    _backends.kernels(backward_backend).weighted_sum_backward(gp, gv, go, p, v)
    check_against_oracle(gp, lambda go_, v_: go_ @ np.swapaxes(np.repeat(v_, group, axis=1), -1, -2), (go, v))

    def ref_v(p_, go_):
        return (np.swapaxes(p_, -1, -2) @ go_).reshape(B, hkv, group, S, Ev).sum(axis=2)

    check_against_oracle(gv, ref_v, (p, go))


# ------------------------------------------------------------------------------------------------ embedding, positions
@given(dtype=DTYPES, seed=SEEDS, vocab=st.integers(1, 300), d=st.integers(1, 70),
       ids_shape=st.lists(st.integers(0, 9), min_size=0, max_size=3), few=st.booleans(),
       strided=st.booleans())  # fmt: skip
@examples(60)
def test_embed_backward_matches_oracle(backward_backend, dtype, seed, vocab, d, ids_shape, few, strided):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(vocab, 3) if few else vocab, size=tuple(ids_shape))  # few: ids repeat a lot
    g = layout(rng, rng.standard_normal(tuple(ids_shape) + (d,)).astype(dtype), "strided" if strided else "contiguous")
    copies = (g.copy(), ids.copy())
    got = fastattn.embed_backward(g, ids, vocab, backend=backward_backend)
    untouched((g, ids), copies)
    assert got.shape == (vocab, d) and got.dtype == dtype
    check_against_oracle(got, lambda g_: oracle.embed_backward(g_, ids, vocab), (np.ascontiguousarray(g),))


@given(dtype=DTYPES, seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), n=st.integers(0, 20),
       d=st.integers(1, 40), extra=st.integers(0, 10), offset=st.integers(0, 5))  # fmt: skip
@examples(40)
def test_add_positions_backward_matches_oracle(backward_backend, dtype, seed, lead, n, d, extra, offset):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(tuple(lead) + (n, d)).astype(dtype)
    P = offset + n + extra
    got = fastattn.add_positions_backward(g, P, offset=offset, backend=backward_backend)
    assert got.shape == (P, d) and got.dtype == dtype
    check_against_oracle(got, lambda g_: oracle.add_positions_backward(g_, P, offset), (g,))


@given(dtype=DTYPES, seed=SEEDS, n=st.integers(1, 20), half=st.integers(1, 20), offset=st.integers(0, 100),
       interleaved=st.booleans(), base=st.sampled_from([100.0, 10000.0]))  # fmt: skip
@examples(40)
def test_apply_rope_backward_matches_oracle(backward_backend, dtype, seed, n, half, offset, interleaved, base):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((2, n, 2 * half)).astype(dtype)
    got = fastattn.apply_rope_backward(g, offset=offset, base=base, interleaved=interleaved, backend=backward_backend)
    check_against_oracle(got, lambda g_: oracle.apply_rope_backward(g_, offset, base, interleaved), (g,))


@given(dtype=DTYPES, seed=SEEDS, B=st.integers(1, 2), N=st.integers(1, 12),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), d=st.sampled_from([2, 4, 6]), causal=st.booleans(),
       padding=st.booleans(), rope=st.booleans())  # fmt: skip
@examples(20)
def test_self_attention_backward_matches_oracle(backward_backend, dtype, seed, B, N, heads, d, causal, padding, rope):
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    D = 8
    args = dict(x=rng.standard_normal((B, N, D)), w_q=rng.standard_normal((D, H * d)) / 3,
                w_k=rng.standard_normal((D, Hkv * d)) / 3, w_v=rng.standard_normal((D, Hkv * d)) / 3,
                w_o=rng.standard_normal((H * d, 5)) / 3, b_k=rng.standard_normal(Hkv * d))  # fmt: skip
    args = {n: a.astype(dtype) for n, a in args.items()}
    kw = dict(n_heads=H, n_kv_heads=Hkv, is_causal=causal, rope={"offset": 2} if rope else None)
    if padding:
        kpm = rng.random((B, N)) > 0.7
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    g = rng.standard_normal((B, N, 5)).astype(dtype)
    got = fastattn.self_attention_backward(g, **args, **kw, backend=backward_backend)
    names = list(args)
    floors = self_attention_floors(g, args, H, Hkv, d, rope) if dtype == np.float32 else {}
    for name in names:

        def ref(g_, *arrays, name=name):
            return oracle.self_attention_backward(g_, **dict(zip(names, arrays, strict=True)), **kw)[name]

        floor = 0.0
        if name in floors:
            ref64 = ref(*(a.astype(np.float64) for a in (g, *[args[n] for n in names])))
            floor = floors[name] + (EPS32 * 4) * float(np.max(np.abs(ref64), initial=0.0))
        check_against_oracle(got[name], ref, (g, *[args[n] for n in names]), floor=floor)


def self_attention_floors(g, args, H, Hkv, d, rope):
    """``gradient_floor``'s cancellation term (an error of up to c in each element of dQ and dK) carried through the
    projections: dW = xᵀ dQ sums B·N rows (c·B·N·max|x|), db sums B·N rows, dx = dQ W_qᵀ + dK W_kᵀ sums their
    columns (c·(H + Hkv)·d·max|W|)."""
    a = {n: np.asarray(v, np.float64) for n, v in args.items()}
    x = a["x"]
    B, N, _ = x.shape
    q = oracle.split_heads(x @ a["w_q"], H)
    k = oracle.split_heads(x @ a["w_k"] + a["b_k"], Hkv)
    v = oracle.split_heads(x @ a["w_v"], Hkv)
    if rope:
        q, k = oracle.apply_rope(q, 2), oracle.apply_rope(k, 2)
    go = oracle.split_heads(np.asarray(g, np.float64) @ a["w_o"].T, H)
    c = gradient_floor(np.zeros(1), go, q, k, np.repeat(v, H // Hkv, axis=1), 1.0 / np.sqrt(d))
    w_max = max(float(np.abs(a["w_q"]).max()), float(np.abs(a["w_k"]).max()))
    return {"w_q": c * B * N * float(np.abs(x).max()), "w_k": c * B * N * float(np.abs(x).max()), "b_k": c * B * N,
            "x": c * (H + Hkv) * d * w_max}  # fmt: skip
