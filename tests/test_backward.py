"""The backward pass: the oracle's gradients held against central finite differences (float64) and torch.autograd,
every backend's backward against the oracle, the forward's ``return_lse`` / ``window``, and bad input.

The hypothesis-driven sweep over shapes, masks and layouts is ``test_backward_properties.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKEND_VARIANTS, backend_variant, check_against_oracle, score_rounding_floor

import fastattn
from fastattn import oracle

FD_RTOL = 1e-6


def central_difference(loss, arrays, index, h=1e-5):
    """d loss / d arrays[index] by central differences, one element at a time (float64)."""
    x = arrays[index]
    grad = np.zeros_like(x)
    for pos in np.ndindex(x.shape):
        saved = x[pos]
        x[pos] = saved + h
        up = loss(*arrays)
        x[pos] = saved - h
        down = loss(*arrays)
        x[pos] = saved
        grad[pos] = (up - down) / (2 * h)
    return grad


def assert_fd_close(analytic, numeric):
    """Relative error <= 1e-6 of the gradient's size (of at least 1e-3: a gradient that is exactly 0, such as the
    key bias's, which shifts every score of a row alike, meets the finite differences' rounding noise)."""
    scale = max(float(np.max(np.abs(numeric), initial=0.0)), 1e-3)
    err = float(np.max(np.abs(analytic - numeric), initial=0.0))
    assert err / scale <= FD_RTOL, f"relative error {err / scale:.2e} vs finite differences"


def rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------ the oracle
SDPA_CASES = {
    "plain": dict(q=(2, 3, 4), k=(2, 5, 4), v=(2, 5, 3), kw={}),
    "causal-L<S": dict(q=(1, 3, 4), k=(1, 5, 4), v=(1, 5, 2), kw=dict(is_causal=True)),
    "window": dict(q=(1, 6, 3), k=(1, 6, 3), v=(1, 6, 2), kw=dict(is_causal=True, window=2)),
    "bool-mask-empty-row": dict(q=(1, 3, 4), k=(1, 4, 4), v=(1, 4, 2), mask="bool", kw={}),
    "float-mask": dict(q=(2, 3, 4), k=(2, 4, 4), v=(2, 4, 2), mask="float", kw={}),
    "gqa": dict(q=(1, 4, 3, 4), k=(1, 2, 5, 4), v=(1, 2, 5, 3), kw=dict(enable_gqa=True)),
    "broadcast": dict(q=(2, 2, 3, 4), k=(1, 2, 5, 4), v=(2, 1, 5, 3), kw=dict(scale=0.7)),
}


def _mask(kind, rng, L, S):
    if kind == "bool":
        m = rng.random((L, S)) > 0.4
        m[1] = False  # a row with no key to attend to
        return m
    if kind == "float":
        m = rng.standard_normal((L, S))
        m[0, 1] = -np.inf
        return m
    return None


@pytest.mark.parametrize("case", SDPA_CASES, ids=list(SDPA_CASES))
def test_oracle_sdpa_backward_matches_finite_differences(case):
    c = SDPA_CASES[case]
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, c["q"]), rand(rng, c["k"]), rand(rng, c["v"])
    mask = _mask(c.get("mask"), rng, c["q"][-2], c["k"][-2])
    out = oracle.scaled_dot_product_attention(q, k, v, mask, **c["kw"])
    g = rand(rng, out.shape)

    def loss(q_, k_, v_):
        return float(np.sum(g * oracle.scaled_dot_product_attention(q_, k_, v_, mask, **c["kw"])))

    grads = oracle.scaled_dot_product_attention_backward(g, q, k, v, mask, **c["kw"])
    for i, grad in enumerate(grads):
        assert grad.shape == (q, k, v)[i].shape
        assert_fd_close(grad, central_difference(loss, [q, k, v], i))
    if c.get("mask") == "bool":  # the row with no key: zero gradient, not NaN
        np.testing.assert_array_equal(grads[0][..., 1, :], 0.0)


def test_oracle_stage_backwards_match_finite_differences():
    rng = np.random.default_rng(2)
    s, gp = rand(rng, (3, 5)), rand(rng, (3, 5))
    assert_fd_close(
        oracle.softmax_backward(gp, oracle.softmax(s)),
        central_difference(lambda s_: float(np.sum(gp * oracle.softmax(s_))), [s], 0),
    )
    q, k, gs = rand(rng, (2, 3, 4)), rand(rng, (2, 5, 4)), rand(rng, (2, 3, 5))
    grads = oracle.attention_scores_backward(gs, q, k, 0.3)
    for i in range(2):
        num = central_difference(lambda q_, k_: float(np.sum(gs * oracle.attention_scores(q_, k_, 0.3))), [q, k], i)
        assert_fd_close(grads[i], num)


def test_oracle_embedding_and_positions_backward_match_finite_differences():
    rng = np.random.default_rng(3)
    table, ids = rand(rng, (6, 3)), np.array([[1, 4, 1], [0, 1, 5]])
    g = rand(rng, (2, 3, 3))
    num = central_difference(lambda t: float(np.sum(g * oracle.embed(ids, t))), [table], 0)
    assert_fd_close(oracle.embed_backward(g, ids, 6), num)
    pos = rand(rng, (7, 3))
    x = rand(rng, (2, 3, 3))
    num = central_difference(lambda p: float(np.sum(g * oracle.add_positions(x, p, 2))), [pos], 0)
    assert_fd_close(oracle.add_positions_backward(g, 7, 2), num)
    for interleaved in (False, True):
        x = rand(rng, (2, 5, 6))
        g = rand(rng, x.shape)

        def loss(x_, g=g, interleaved=interleaved):
            return float(np.sum(g * oracle.apply_rope(x_, 3, 100.0, interleaved)))

        num = central_difference(loss, [x], 0)
        assert_fd_close(oracle.apply_rope_backward(g, 3, 100.0, interleaved), num)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_heads=2),
        dict(n_heads=4, n_kv_heads=2, is_causal=True, rope={"base": 100.0, "interleaved": True, "offset": 1}),
        dict(n_heads=2, key_padding_mask="bool", bias=True, w_o=True),
    ],
    ids=["plain", "gqa-causal-rope", "padding-biases-wo"],
)
def test_oracle_self_attention_backward_matches_finite_differences(kw):
    kw = dict(kw)
    rng = np.random.default_rng(4)
    B, N, D = 2, 4, 8
    H, Hkv = kw["n_heads"], kw.get("n_kv_heads", kw["n_heads"])
    d = D // H
    args = {"x": rand(rng, (B, N, D)), "w_q": rand(rng, (D, H * d)) / 2, "w_k": rand(rng, (D, Hkv * d)) / 2,
            "w_v": rand(rng, (D, Hkv * d)) / 2}  # fmt: skip
    if kw.pop("w_o", False):
        args["w_o"] = rand(rng, (H * d, 5)) / 2
    if kw.pop("bias", False):
        args.update(b_q=rand(rng, H * d), b_k=rand(rng, Hkv * d), b_v=rand(rng, Hkv * d), b_o=rand(rng, 5))
    if kw.get("key_padding_mask") == "bool":
        kw["key_padding_mask"] = np.array([[False, False, True, False], [False, False, False, False]])
    names = list(args)
    out = oracle.self_attention(**args, **kw)
    g = rand(rng, out.shape)

    def loss(*arrays):
        return float(np.sum(g * oracle.self_attention(**dict(zip(names, arrays, strict=True)), **kw)))

    grads = oracle.self_attention_backward(g, **args, **kw)
    assert set(grads) == set(names)
    arrays = [args[n] for n in names]
    for i, name in enumerate(names):
        assert_fd_close(grads[name], central_difference(loss, arrays, i))


@pytest.mark.parametrize("case", SDPA_CASES, ids=list(SDPA_CASES))
def test_oracle_sdpa_backward_matches_torch_autograd(case):
    torch = pytest.importorskip("torch")
    c = SDPA_CASES[case]
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, c["q"]), rand(rng, c["k"]), rand(rng, c["v"])
    mask = _mask(c.get("mask"), rng, c["q"][-2], c["k"][-2])
    if c.get("mask") == "bool":
        mask[1, 0] = True  # torch's math path gives NaN for a row with no key; ours gives 0 (tested above)
    kw = dict(c["kw"])
    window = kw.pop("window", None)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tmask = None if mask is None else torch.tensor(mask)
    if window is not None:  # torch has no window: the same band as a boolean mask
        kw.pop("is_causal")
        tmask = torch.tensor(oracle.causal_mask(q.shape[-2], k.shape[-2], 0, window))
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, **kw)
    g = rand(rng, tuple(t_out.shape))
    t_out.backward(torch.tensor(g))
    grads = oracle.scaled_dot_product_attention_backward(g, q, k, v, mask, **c["kw"])
    for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


def test_oracle_self_attention_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    B, N, D, H = 2, 5, 8, 2
    args = {n: rand(rng, s) / 2 for n, s in [("x", (B, N, D)), ("w_q", (D, D)), ("w_k", (D, D)), ("w_v", (D, D)),
                                            ("w_o", (D, D)), ("b_q", (D,)), ("b_o", (D,))]}  # fmt: skip
    t = {n: torch.tensor(a, requires_grad=True) for n, a in args.items()}

    def heads(y):
        return y.reshape(B, N, H, -1).transpose(1, 2)

    q, k, v = heads(t["x"] @ t["w_q"] + t["b_q"]), heads(t["x"] @ t["w_k"]), heads(t["x"] @ t["w_v"])
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = o.transpose(1, 2).reshape(B, N, D) @ t["w_o"] + t["b_o"]
    g = rand(rng, (B, N, D))
    y.backward(torch.tensor(g))
    grads = oracle.self_attention_backward(g, **args, n_heads=H, is_causal=True)
    for name in args:
        np.testing.assert_allclose(grads[name], t[name].grad.numpy(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the public API
def test_return_lse_and_window_forward(backend):
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        q, k, v = rand(rng, (2, 3, 9, 8), dtype), rand(rng, (2, 3, 9, 8), dtype), rand(rng, (2, 3, 9, 4), dtype)
        kws = [dict(is_causal=True), dict(is_causal=True, window=3), {}]
        for kw in kws:
            out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kw)
            assert lse.shape == (2, 3, 9) and lse.dtype == dtype
            check_against_oracle(out, lambda a, b, c, kw=kw: oracle.scaled_dot_product_attention(a, b, c, **kw),
                                 (q, k, v))  # fmt: skip
            check_against_oracle(lse, lambda a, b, c, kw=kw: oracle.scaled_dot_product_attention_lse(a, b, c, **kw),
                                 (q, k, v))  # fmt: skip
            plain = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
            np.testing.assert_array_equal(plain, out)
    mask = np.ones((4, 5), bool)
    mask[2] = False
    out, lse = fastattn.scaled_dot_product_attention(q[..., :4, :], k[..., :5, :], v[..., :5, :], mask,
                                                     return_lse=True, backend=backend)  # fmt: skip
    assert np.all(np.isneginf(lse[..., 2])) and np.all(np.isfinite(lse[..., [0, 1, 3]]))
    np.testing.assert_array_equal(out[..., 2, :], 0.0)


CASES = {
    "plain-f64": dict(q=(2, 3, 7, 8), k=(2, 3, 9, 8), v=(2, 3, 9, 5), kw={}),
    "causal-f32": dict(q=(1, 2, 9, 16), k=(1, 2, 9, 16), v=(1, 2, 9, 16), kw=dict(is_causal=True), dtype=np.float32),
    "window-f64": dict(q=(1, 2, 11, 4), k=(1, 2, 11, 4), v=(1, 2, 11, 3), kw=dict(is_causal=True, window=4)),
    "gqa-mask-f32": dict(
        q=(2, 4, 6, 8), k=(2, 2, 7, 8), v=(2, 2, 7, 8), mask="bool", kw=dict(enable_gqa=True), dtype=np.float32
    ),  # fmt: skip
    "broadcast-f64": dict(q=(3, 1, 5, 6), k=(1, 2, 7, 6), v=(3, 2, 7, 2), mask="float", kw=dict(scale=0.4)),
    "2d-f64": dict(q=(5, 3), k=(4, 3), v=(4, 2), kw={}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_sdpa_backward_against_oracle(backward_backend, case):
    c = CASES[case]
    dtype = c.get("dtype", np.float64)
    rng = np.random.default_rng(8)
    q, k, v = rand(rng, c["q"], dtype), rand(rng, c["k"], dtype), rand(rng, c["v"], dtype)
    mask = _mask(c.get("mask"), rng, c["q"][-2], c["k"][-2])
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, backend=backward_backend,
                                                     **c["kw"])  # fmt: skip
    g = rand(rng, out.shape, dtype)
    copies = [a.copy() for a in (g, q, k, v, out, lse)]
    grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, mask, backend=backward_backend,
                                                           **c["kw"])  # fmt: skip
    for a, c_ in zip((g, q, k, v, out, lse), copies, strict=True):
        np.testing.assert_array_equal(a, c_)
    for i, grad in enumerate(grads):
        assert grad.shape == (q, k, v)[i].shape and grad.dtype == dtype

        def ref(g_, q_, k_, v_, i=i):
            return oracle.scaled_dot_product_attention_backward(g_, q_, k_, v_, mask, **c["kw"])[i]

        check_against_oracle(grad, ref, (g, q, k, v))


def _rounded_oracle_forward(q, k, v, mask, kw):
    """out and lse of the float64 oracle, each rounded once to float32: the most accurate a forward can hand over."""
    q64, k64, v64, m64 = (a.astype(np.float64) for a in (q, k, v, mask))
    out = oracle.scaled_dot_product_attention(q64, k64, v64, m64, **kw)
    group = q.shape[-3] // k.shape[-3]
    scale = 1.0 / np.sqrt(q.shape[-1])  # the default scale (kw has none)
    s = oracle.attention_scores(q64, np.repeat(k64, group, axis=-3), scale, m64)  # (..., L, S)
    top = s.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(s - top).sum(axis=-1, keepdims=True)))[..., 0]
    return out.astype(np.float32), lse.astype(np.float32)


@pytest.mark.parametrize("forward", ["oracle"] + BACKEND_VARIANTS)
def test_sdpa_backward_from_any_forward(backward_backend, forward):
    """The backward's float32 error does not depend on how the forward rounded its scores (out and lse from the
    rounded float64 oracle, or from any backend and tile products): near-tied scores of ~2450 (inputs of magnitude
    30, E = 2), where one ulp of a score (2.4e-4) between the forward's P and the one the backward recomputes broke
    rowsum(dS) = 0 by ~1e-5, and dQ = dS K made that 1e-3 (|K| ~ 85): past the bound, while the naive float32
    computation, consistent with itself, errs by 1e-9. The regression example of test_backward_properties."""
    from test_backward_properties import gradient_floor

    rng = np.random.default_rng(1)
    q = (rng.standard_normal((2, 1, 2)) * 30).astype(np.float32)  # (Hq, L, E): two query heads
    k = (rng.standard_normal((1, 343, 2)) * 30).astype(np.float32)  # one key/value head (GQA)
    v = rng.standard_normal((1, 343, 9)).astype(np.float32)
    mask = rng.standard_normal((2, 1, 343)).astype(np.float32)  # additive
    kw = dict(enable_gqa=True)
    if forward == "oracle":
        out, lse = _rounded_oracle_forward(q, k, v, mask, kw)
    else:
        with backend_variant(forward) as name:
            out, lse = fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, backend=name, **kw)
    g = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, mask, backend=backward_backend, **kw)
    for i, grad in enumerate(grads):

        def ref(g_, q_, k_, v_, m_, i=i):
            return oracle.scaled_dot_product_attention_backward(g_, q_, k_, v_, m_, **kw)[i]

        floor = gradient_floor(ref(*(a.astype(np.float64) for a in (g, q, k, v, mask))), g, q, k, v, None)
        check_against_oracle(grad, ref, (g, q, k, v, mask), floor=floor)


def test_sdpa_backward_against_torch(backward_backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    for causal in (False, True):
        q, k, v = (rand(rng, (2, 4, 33, 16), np.float32) for _ in range(3))
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True,
                                                         backend=backward_backend)  # fmt: skip
        g = rand(rng, out.shape, np.float32)
        grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=causal,
                                                               backend=backward_backend)  # fmt: skip
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).backward(torch.tensor(g))
        for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-3, atol=1e-4)


def test_embedding_positions_rope_backward_against_oracle(backward_backend):
    rng = np.random.default_rng(10)
    for dtype in (np.float32, np.float64):
        ids = rng.integers(0, 7, size=(3, 11))
        g = rand(rng, (3, 11, 5), dtype)
        got = fastattn.embed_backward(g, ids, 9, backend=backward_backend)
        assert got.shape == (9, 5) and got.dtype == dtype
        np.testing.assert_array_equal(got[7:], 0.0)
        check_against_oracle(got, lambda g_, ids=ids: oracle.embed_backward(g_, ids, 9), (g,))
        got = fastattn.add_positions_backward(g, 20, offset=4, backend=backward_backend)
        check_against_oracle(got, lambda g_: oracle.add_positions_backward(g_, 20, 4), (g,))
        g6 = rand(rng, (2, 3, 11, 6), dtype)
        for interleaved in (False, True):
            got = fastattn.apply_rope_backward(g6, offset=2, interleaved=interleaved, backend=backward_backend)
            check_against_oracle(got, lambda g_, il=interleaved: oracle.apply_rope_backward(g_, 2, 10000.0, il), (g6,))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_self_attention_backward_against_oracle(backward_backend, dtype):
    rng = np.random.default_rng(11)
    B, N, D, H, Hkv = 2, 7, 16, 4, 2
    args = dict(x=rand(rng, (B, N, D), dtype), w_q=rand(rng, (D, D), dtype) / 4, w_k=rand(rng, (D, 8), dtype) / 4,
                w_v=rand(rng, (D, 8), dtype) / 4, w_o=rand(rng, (D, 6), dtype) / 4, b_q=rand(rng, D, dtype),
                b_v=rand(rng, 8, dtype), b_o=rand(rng, 6, dtype))  # fmt: skip
    kpm = np.zeros((B, N), bool)
    kpm[1, 2] = True
    kw = dict(n_heads=H, n_kv_heads=Hkv, is_causal=True, key_padding_mask=kpm, rope={"base": 500.0})
    g = rand(rng, (B, N, 6), dtype)
    got = fastattn.self_attention_backward(g, **args, **kw, backend=backward_backend)
    assert list(got) == ["x", "w_q", "w_k", "w_v", "w_o", "b_q", "b_v", "b_o"]
    names = list(args)
    for name in names:
        assert got[name].shape == args[name].shape and got[name].dtype == dtype

        def ref(g_, *arrays, name=name):
            return oracle.self_attention_backward(g_, **dict(zip(names, arrays, strict=True)), **kw)[name]

        check_against_oracle(got[name], ref, (g, *[args[n] for n in names]))
    got2 = fastattn.self_attention_backward(g[0], **{**args, "x": args["x"][0]}, **{**kw, "key_padding_mask": None},
                                            backend=backward_backend)  # fmt: skip
    assert got2["x"].shape == (N, D)


def test_empty_and_degenerate_backward(backward_backend):
    b = backward_backend
    q = np.zeros((1, 2, 0, 4))
    k = v = np.zeros((1, 2, 3, 4))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=b)
    gq, gk, gv = fastattn.scaled_dot_product_attention_backward(out, q, k, v, out, lse, backend=b)
    assert gq.shape == q.shape and np.all(gk == 0) and np.all(gv == 0)
    q = np.ones((1, 2, 3, 4))
    k = v = np.zeros((1, 2, 0, 4))
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=b)
    assert np.all(np.isneginf(lse))
    gq, gk, gv = fastattn.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse, backend=b)
    assert np.all(gq == 0) and gk.shape == k.shape
    assert fastattn.embed_backward(np.zeros((0, 3)), np.zeros(0, int), 4, backend=b).shape == (4, 3)


# ------------------------------------------------------------------------------------------------ bad input
Q = np.zeros((2, 3, 5, 4), np.float32)
K = np.zeros((2, 3, 6, 4), np.float32)
O = np.zeros((2, 3, 5, 4), np.float32)
LSE = np.zeros((2, 3, 5), np.float32)


def bw(b, g=O, q=Q, k=K, v=K, out=O, lse=LSE, **kw):
    return fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, backend=b, **kw)


BAD = [
    (lambda b: bw(b, g=O[..., :3]), ValueError,
     r"grad_out must have the shape of the attention output, \(2, 3, 5, 4\)"),
    (lambda b: bw(b, out=O[:1]), ValueError, r"out must have the shape of the attention output"),
    (lambda b: bw(b, lse=LSE[..., None]), ValueError, r"lse must have the shape of the output without its last axis"),
    (lambda b: bw(b, lse=LSE[..., :4]), ValueError, r"lse must have the shape .* \(2, 3, 5\), got shape \(2, 3, 4\)"),
    (lambda b: bw(b, g=O.astype(np.float64)), TypeError, r"grad_out.dtype=float64 differs from"),
    (lambda b: bw(b, lse=LSE.astype(np.float64)), TypeError, r"lse.dtype=float64 differs"),
    (lambda b: bw(b, out=O.astype(np.int32)), TypeError,
     r"out must be a float32 or float64 array, got: out.dtype=int32"),
    (lambda b: bw(b, g=None), TypeError, r"grad_out must be a float32 or float64 array, got type NoneType"),
    (lambda b: bw(b, k=K.astype(np.float64)), TypeError, r"arrays must share one float dtype"),
    (lambda b: bw(b, k=K[..., :3]), ValueError, r"query and key must share the last dimension"),
    (lambda b: bw(b, window=2), ValueError, r"window=2 needs is_causal=True"),
    (lambda b: bw(b, window=0, is_causal=True), ValueError, r"window must be >= 1, got 0"),
    (lambda b: bw(b, is_causal=True, attn_mask=np.ones((5, 6), bool)), ValueError, r"cannot be combined"),
    (lambda b: bw(b, attn_mask=np.ones((5, 7), bool)), ValueError, r"attn_mask of shape \(5, 7\) does not broadcast"),
    (lambda b: fastattn.scaled_dot_product_attention(Q, K, K, return_lse=1, backend=b), TypeError,
     r"return_lse must be True or False"),
    (lambda b: fastattn.embed_backward(np.zeros((3, 2)), [0, 1], 4, backend=b), ValueError,
     r"grad_out must have the shape of token_ids plus one axis, \(2,\) \+ \(D,\), got shape \(3, 2\)"),
    (lambda b: fastattn.embed_backward(np.zeros((2, 2)), [0, 4], 4, backend=b), IndexError, r"token_ids holds id 4"),
    (lambda b: fastattn.embed_backward(np.zeros((2, 2), int), [0, 1], 4, backend=b), TypeError, r"grad_out.dtype=int"),
    (lambda b: fastattn.add_positions_backward(np.zeros((2, 5, 3)), 6, offset=2, backend=b), ValueError,
     r"n_positions=6 rows cannot hold offset \+ N = 2 \+ 5 = 7"),
    (lambda b: fastattn.add_positions_backward(np.zeros(3), 6, backend=b), ValueError,
     r"grad_out must have at least 2 dimensions"),
    (lambda b: fastattn.apply_rope_backward(np.zeros((2, 5)), backend=b), ValueError, r"even last dimension"),
    (lambda b: fastattn.self_attention_backward(np.zeros((2, 5, 7), np.float32), np.zeros((2, 5, 8), np.float32),
                                                *[np.zeros((8, 8), np.float32)] * 3, n_heads=2, backend=b),
     ValueError, r"grad_out must have the shape of the output, \(2, 5, 8\), got shape \(2, 5, 7\)"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_backward_bad_input(backward_backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backward_backend)


# ------------------------------------------------------------------------------------------------ determinism
def _backward_results(backend):
    rng = np.random.default_rng(12)
    q, k, v = (
        rand(rng, (2, 4, 200, 16), np.float32),
        rand(rng, (2, 2, 300, 16), np.float32),
        rand(rng, (2, 2, 300, 8), np.float32),
    )
    results = {}
    for kw in (dict(enable_gqa=True), dict(enable_gqa=True, is_causal=True, window=50)):
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kw)
        g = rand(rng, out.shape, np.float32)
        grads = fastattn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, backend=backend, **kw)
        for name, grad in zip("qkv", grads, strict=True):
            results[f"grad_{name} {kw}"] = grad
    ids = rng.integers(0, 5, size=(4, 500))  # ids repeat: each row of the table sums ~400 rows of grad_out
    g = rand(rng, (4, 500, 33), np.float32)
    results["embed_backward"] = fastattn.embed_backward(g, ids, 7, backend=backend)
    results["add_positions_backward"] = fastattn.add_positions_backward(g, 600, offset=3, backend=backend)
    return results


@pytest.mark.parametrize("n_threads", [1, 2])
def test_backward_bitwise_the_same_for_any_thread_count(backward_backend, n_threads):
    """Every gradient element has one writer and a fixed order of summation: 1 and 2 threads agree bitwise."""
    if n_threads > fastattn.get_num_threads():
        pytest.skip(f"needs {n_threads} threads")
    with fastattn.set_num_threads(1):
        one = _backward_results(backward_backend)
    with fastattn.set_num_threads(n_threads):
        for _ in range(2):
            for name, got in _backward_results(backward_backend).items():
                np.testing.assert_array_equal(got, one[name], err_msg=f"{name} with {n_threads} threads")


# ------------------------------------------------------------------------------------------------ decoding
DECODE_CASES = {
    "full": dict(),
    "bottom-right": dict(causal=True, offset="S-1"),
    "window": dict(causal=True, offset="S-1", window=1500),
    "short-offset": dict(causal=True, offset=700),  # only the first part sees keys
    "mask-bias": dict(mask=True, bias=True),
    "no-key": dict(causal=True, offset=-1),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", DECODE_CASES, ids=list(DECODE_CASES))
def test_decode_split_keys_against_oracle(compiled_backend, dtype, case):
    """L == 1 over many keys (the numba kernels split them across threads, merged by log-sum-exp): output and lse
    against the oracle; bitwise the same with 1 and 2 threads."""
    c = DECODE_CASES[case]
    rng = np.random.default_rng(13)
    B, Hq, Hkv, S, E, Ev = 1, 4, 2, 5000, 16, 8
    q, k, v = rand(rng, (B, Hq, 1, E), dtype), rand(rng, (B, Hkv, S, E), dtype), rand(rng, (B, Hkv, S, Ev), dtype)
    offset = S - 1 if c.get("offset") == "S-1" else c.get("offset", 0)
    window = c.get("window", 0)
    mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype), (B, Hq, 1, S))
    add = np.zeros((1, 1, 1, S), dtype)
    if c.get("mask"):
        raw = np.where(rng.random((1, Hq, 1, S)) > 0.5, rng.standard_normal((1, Hq, 1, S)), -np.inf).astype(dtype)
        mask = np.broadcast_to(raw, (B, Hq, 1, S))
        add = add + raw
    kb = np.broadcast_to(np.zeros((1, 1), dtype), (B, S))
    if c.get("bias"):
        kb = rand(rng, (B, S), dtype)
        add = add + kb[:, None, None, :]
    causal = c.get("causal", False)
    if causal:
        add = add + np.where(oracle.causal_mask(1, S, offset, window), 0.0, -np.inf).astype(dtype)
    from fastattn import _backends

    kern = _backends.kernels(compiled_backend)

    def run():
        out, lse = np.full((B, Hq, 1, Ev), np.nan, dtype), np.full((B, Hq, 1), np.nan, dtype)
        kern.attention(out, lse, q, k, v, 0.25, causal, offset, window, mask, bool(c.get("mask")), kb,
                       bool(c.get("bias")))  # fmt: skip
        return out, lse

    with fastattn.set_num_threads(1):
        out, lse = run()
    for n in range(2, min(2, fastattn.get_num_threads()) + 1):
        with fastattn.set_num_threads(n):
            out2, lse2 = run()
        np.testing.assert_array_equal(out2, out)
        np.testing.assert_array_equal(lse2, lse)

    def ref(q_, k_, v_, add_):
        return oracle.scaled_dot_product_attention(q_, k_, v_, add_, scale=0.25, enable_gqa=True)

    def ref_lse(q_, k_, v_, add_):
        return oracle.scaled_dot_product_attention_lse(q_, k_, v_, add_, scale=0.25, enable_gqa=True)

    floor = score_rounding_floor(q, k, v, 0.25)
    check_against_oracle(out, ref, (q, k, v, add), floor=floor)
    if case == "no-key":
        assert np.all(np.isneginf(lse)) and np.all(out == 0)
    else:
        check_against_oracle(lse, ref_lse, (q, k, v, add), floor=floor)


def test_decode_split_keeps_a_nan_in_its_row(compiled_backend):
    rng = np.random.default_rng(14)
    q, k, v = (
        rand(rng, (1, 3, 1, 8), np.float32),
        rand(rng, (1, 3, 4000, 8), np.float32),
        rand(rng, (1, 3, 4000, 8), np.float32),
    )
    q[0, 1, 0, 3] = np.nan
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend=compiled_backend)
    assert np.all(np.isnan(out[0, 1])) and np.isnan(lse[0, 1, 0])
    assert np.all(np.isfinite(out[0, [0, 2]])) and np.all(np.isfinite(lse[0, [0, 2]]))
