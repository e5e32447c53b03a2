"""The training kernels of the block family (LayerNorm, GELU, bias backward, head layout, fused cross-entropy).

Held three ways (STYLE.md, example 14):

- every backend against the oracle (``fastattn._numpy_blocks``), hypothesis-driven over shapes and dtypes, with the
  suite's tolerance rule: float64 within ~1e-10 of the oracle's scale; float32 within ``FLOAT32_FACTOR`` times the
  error of the naive float32 computation (the same formula evaluated in float32 NumPy, written below) plus a few
  ulps of the result's scale;
- the oracle against central finite differences of the forward oracle, in float64;
- the oracle against torch.autograd in float64 (skipped without torch).

Plus what must not matter: in-place calls (the aliasing the contract allows), the thread count (row sums are
bitwise the same), and empty inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BACKENDS, COMPILED, FLOAT32_FACTOR, FLOAT64_RTOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattn import _backends
from fastattn import _numpy_blocks as O

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GELU_KERNELS = ("gelu_backward", "gelu_tanh_backward", "bias_gelu_backward", "bias_gelu_tanh_backward")


def blocks(backend):
    return _backends.kernels(backend, family="blocks")


def assert_within_rule(got, ref, naive):
    """``got`` against the float64 ``ref``: 1e-10 of the scale in float64; in float32, FLOAT32_FACTOR times the
    error of ``naive`` (the float32 computation) plus 4 ulps of the scale."""
    dtype = np.asarray(got).dtype
    got, ref, naive = (np.asarray(a, np.float64) for a in (got, ref, naive))
    assert got.shape == ref.shape
    scale = float(np.max(np.abs(ref), initial=0.0)) + 1.0
    err = float(np.max(np.abs(got - ref), initial=0.0))
    if dtype == np.float64:
        bound = FLOAT64_RTOL * scale
    else:
        naive_err = float(np.max(np.abs(naive - ref), initial=0.0))
        bound = FLOAT32_FACTOR * naive_err + 4 * float(np.finfo(np.float32).eps) * scale
    assert err <= bound, f"error {err:.3e} exceeds the {dtype} bound {bound:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# Naive computations in the working dtype (the float32 baseline of the tolerance rule), literally from the math
# ----------------------------------------------------------------------------------------------------------------
def naive_layer_norm_backward(go, x, gamma, eps):
    D = x.shape[-1]
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + x.dtype.type(eps))
    xhat = (x - mean) * rstd
    g = go * gamma
    gx = rstd * (g - g.sum(-1, keepdims=True) / D - xhat * (g * xhat).sum(-1, keepdims=True) / D)
    return gx, (go * xhat).sum(0), go.sum(0)


def naive_gelu_grad(y, tanh_form):
    from scipy.special import erf  # keeps float32 in float32

    if tanh_form:
        c = y.dtype.type(math.sqrt(2 / math.pi))
        th = np.tanh(c * (y + y.dtype.type(0.044715) * y**3))
        return y.dtype.type(0.5) * (1 + th) + y.dtype.type(0.5) * y * (1 - th * th) * c * (
            1 + y.dtype.type(3 * 0.044715) * y * y
        )
    return y.dtype.type(0.5) * (1 + erf(y / y.dtype.type(math.sqrt(2)))) + y * np.exp(
        -y * y / y.dtype.type(2)
    ) / y.dtype.type(math.sqrt(2 * math.pi))


def naive_cross_entropy(z, labels, scale):
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    p = e / s
    rows = np.arange(len(z))
    counted = labels >= 0
    safe = np.where(counted, labels, 0)
    loss = np.where(counted, (np.log(s[:, 0]) + m[:, 0] - z[rows, safe]), 0)
    grad = p * z.dtype.type(scale)
    grad[rows, safe] -= z.dtype.type(scale)
    grad[~counted] = 0
    return loss, grad


# ----------------------------------------------------------------------------------------------------------------
# Every backend against the oracle (hypothesis)
# ----------------------------------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 70), st.integers(1, 130))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), residual=st.booleans(), big=st.booleans())
def test_layer_norm_backward_matches_oracle(backend, dtype, shape, seed, residual, big):
    rng = np.random.default_rng(seed)
    R, D = shape
    x = (rng.standard_normal((R, D)) * (30.0 if big else 1.0) + (5.0 if big else 0.0)).astype(dtype)
    go, res = (rng.standard_normal((R, D)).astype(dtype) for _ in range(2))
    gamma = rng.standard_normal(D).astype(dtype)
    gx, gg, gb = np.empty_like(x), np.empty(D, dtype), np.empty(D, dtype)
    blocks(backend).layer_norm_backward(gx, gg, gb, go, x, gamma, 1e-5, res, residual)
    ref = O.layer_norm_grads(go, x, gamma, 1e-5)
    naive = naive_layer_norm_backward(go, x, gamma, 1e-5)
    add = res.astype(np.float64) if residual else 0.0
    assert_within_rule(gx, ref[0] + add, naive[0] + (res if residual else 0))
    assert_within_rule(gg, ref[1], naive[1])
    assert_within_rule(gb, ref[2], naive[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GELU_KERNELS)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.5, 3.0, 12.0]))
def test_gelu_backward_matches_oracle(backend, dtype, name, shape, seed, spread):
    rng = np.random.default_rng(seed)
    R, D = shape
    x = (rng.standard_normal((R, D)) * spread).astype(dtype)
    go = rng.standard_normal((R, D)).astype(dtype)
    b = rng.standard_normal(D).astype(dtype)
    with_bias = name.startswith("bias_")
    tanh_form = "tanh" in name
    got = np.empty_like(x)
    getattr(blocks(backend), name)(got, go, x, *((b,) if with_bias else ()))
    y64 = x.astype(np.float64) + (b if with_bias else 0)
    ref = go * (O.gelu_tanh_grad(y64) if tanh_form else O.gelu_exact_grad(y64))
    naive = go * naive_gelu_grad(x + b if with_bias else x, tanh_form)
    assert_within_rule(got, ref, naive)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_bias_backward_matches_oracle(backend, dtype, shape, seed):
    rng = np.random.default_rng(seed)
    go = rng.standard_normal(shape).astype(dtype)
    got = np.empty(shape[1], dtype)
    blocks(backend).bias_backward(got, go)
    assert_within_rule(got, go.astype(np.float64).sum(0), go.sum(0))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    R=st.integers(1, 40),
    V=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([1.0, 10.0, 60.0]),
    ignored=st.floats(0.0, 1.0),
)
def test_cross_entropy_matches_oracle(backend, dtype, R, V, seed, spread, ignored):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((R, V)) * spread + rng.standard_normal((R, 1)) * 50).astype(dtype)
    labels = rng.integers(0, V, R)
    labels[rng.random(R) < ignored] = -100
    scale = 1.0 / max(1, int((labels >= 0).sum()))
    loss, grad = np.empty(R, dtype), np.empty_like(z)
    blocks(backend).cross_entropy(loss, grad, z, labels, scale)
    ref_loss, ref_grad = np.empty(R), np.empty((R, V))
    O.cross_entropy(ref_loss, ref_grad, z.astype(np.float64), labels, scale)
    naive_loss, naive_grad = naive_cross_entropy(z, labels, scale)
    assert_within_rule(loss, ref_loss, naive_loss)
    assert_within_rule(grad, ref_grad, naive_grad)
    assert np.all(grad[labels < 0] == 0) and np.all(loss[labels < 0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 4), (3, 2, 7, 9)])
def test_head_layout_backward_matches_oracle(backend, dtype, shape):
    """split_qkv_backward and merge_heads_backward are exact copies: bitwise the oracle's."""
    rng = np.random.default_rng(1)
    B, H, L, d = shape
    gq, gk, gv = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    got, want = np.empty((B, L, 3 * H * d), dtype), np.empty((B, L, 3 * H * d), dtype)
    blocks(backend).split_qkv_backward(got, gq, gk, gv)
    O.split_qkv_backward(want, gq, gk, gv)
    assert np.array_equal(got, want)
    # the forward split of the merged gradient gives the three back (with a zero bias)
    q, k, v = (np.empty(shape, dtype) for _ in range(3))
    O.split_qkv(q, k, v, got, np.zeros(3 * H * d, dtype), 0)
    assert np.array_equal(q, gq) and np.array_equal(k, gk) and np.array_equal(v, gv)
    go = rng.standard_normal((B, L, H * d)).astype(dtype)
    o = np.empty(shape, dtype)
    blocks(backend).merge_heads_backward(o, go)
    back = np.empty_like(go)
    O.merge_heads(back, o)
    assert np.array_equal(back, go)


# ----------------------------------------------------------------------------------------------------------------
# Aliasing, thread count, empty inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_calls_give_the_same_results(backend, dtype):
    rng = np.random.default_rng(5)
    R, D, V = 19, 67, 301
    blk = blocks(backend)
    x, go, res = (rng.standard_normal((R, D)).astype(dtype) for _ in range(3))
    gamma, b = rng.standard_normal(D).astype(dtype), rng.standard_normal(D).astype(dtype)
    want = [np.empty_like(x), np.empty(D, dtype), np.empty(D, dtype)]
    blk.layer_norm_backward(*want, go, x, gamma, 1e-5, res, True)
    for alias in ("grad_out", "grad_residual"):
        g2, r2 = go.copy(), res.copy()
        out = g2 if alias == "grad_out" else r2
        gg, gb = np.empty(D, dtype), np.empty(D, dtype)
        blk.layer_norm_backward(out, gg, gb, g2, x, gamma, 1e-5, r2, True)
        assert np.array_equal(out, want[0]) and np.array_equal(gg, want[1]) and np.array_equal(gb, want[2])
    for name in GELU_KERNELS:
        args = (b,) if name.startswith("bias_") else ()
        out = np.empty_like(x)
        getattr(blk, name)(out, go, x, *args)
        inplace = go.copy()
        getattr(blk, name)(inplace, inplace, x, *args)
        assert np.array_equal(inplace, out), name
    z = rng.standard_normal((R, V)).astype(dtype) * 4
    labels = rng.integers(-1, V, R)
    loss, grad = np.empty(R, dtype), np.empty_like(z)
    blk.cross_entropy(loss, grad, z, labels, 0.25)
    loss2 = np.empty(R, dtype)
    blk.cross_entropy(loss2, z, z, labels, 0.25)
    assert np.array_equal(z, grad) and np.array_equal(loss, loss2)


@pytest.mark.parametrize("backend", COMPILED or ["numpy"])
def test_row_sums_do_not_depend_on_the_thread_count(backend):
    blk = blocks(backend)
    rng = np.random.default_rng(2)
    R, D = 301, 200
    x, go = (rng.standard_normal((R, D)).astype(np.float32) for _ in range(2))
    gamma = rng.standard_normal(D).astype(np.float32)
    before = blk.get_num_threads()
    results = []
    try:
        for n in sorted({1, max(1, before)}):
            blk.set_num_threads(n)
            outs = [np.empty_like(x), np.empty(D, np.float32), np.empty(D, np.float32), np.empty(D, np.float32)]
            blk.layer_norm_backward(*outs[:3], go, x, gamma, 1e-5, x, False)
            blk.bias_backward(outs[3], go)
            results.append(outs)
    finally:
        blk.set_num_threads(before)
    for a, b in zip(results[0], results[-1], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_inputs(backend, shape):
    blk = blocks(backend)
    R, D = shape
    x = np.zeros(shape)
    gg, gb, gbias = np.full(D, 7.0), np.full(D, 7.0), np.full(D, 7.0)
    blk.layer_norm_backward(np.empty_like(x), gg, gb, x, x, np.ones(D), 1e-5, x, True)
    blk.bias_backward(gbias, x)
    assert np.all(gg == 0) and np.all(gb == 0) and np.all(gbias == 0)
    blk.bias_gelu_tanh_backward(np.empty_like(x), x, x, np.zeros(D))
    if D:
        blk.cross_entropy(np.empty(R), np.empty_like(x), x, np.zeros(R, np.int64), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The oracle against finite differences (float64) and torch.autograd
# ----------------------------------------------------------------------------------------------------------------
def central_difference(f, x, h=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def assert_close_fd(analytic, numeric):
    err = np.max(np.abs(analytic - numeric)) / (np.max(np.abs(numeric)) + 1e-12)
    assert err <= 1e-6, f"relative error {err:.2e} against finite differences"


def test_layer_norm_oracle_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, go = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    gamma, beta = rng.standard_normal(6), rng.standard_normal(6)

    def f():
        return float(np.sum(go * O.layer_norm_rows(x, gamma, beta, 1e-5)))

    gx, gg, gb = O.layer_norm_grads(go, x, gamma, 1e-5)
    assert_close_fd(gx, central_difference(f, x))
    assert_close_fd(gg, central_difference(f, gamma))
    assert_close_fd(gb, central_difference(f, beta))


@pytest.mark.parametrize("tanh_form", [False, True])
def test_gelu_oracle_matches_finite_differences(tanh_form):
    y = np.linspace(-6, 6, 41)
    fwd = O.gelu_tanh_form if tanh_form else O.gelu_exact
    grad = O.gelu_tanh_grad(y) if tanh_form else O.gelu_exact_grad(y)
    h = 1e-6
    assert_close_fd(grad, (fwd(y + h) - fwd(y - h)) / (2 * h))


def test_cross_entropy_oracle_matches_finite_differences():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 9)) * 3
    labels = np.array([2, -100, 8, 0])
    scale = 1 / 3

    def f():
        loss = np.empty(4)
        O.cross_entropy(loss, np.empty_like(z), z, labels, scale)
        return float(loss.sum() * scale)

    loss, grad = np.empty(4), np.empty_like(z)
    O.cross_entropy(loss, grad, z, labels, scale)
    assert_close_fd(grad, central_difference(f, z))
    picked = z[[0, 2, 3], [2, 8, 0]]
    want = np.log(np.exp(z[[0, 2, 3]]).sum(-1)) - picked
    np.testing.assert_allclose(loss[[0, 2, 3]], want, rtol=1e-13)
    assert loss[1] == 0 and np.all(grad[1] == 0)


def test_oracles_match_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    R, D, V = 5, 12, 17
    x, go = rng.standard_normal((R, D)), rng.standard_normal((R, D))
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    (torch.nn.functional.layer_norm(tx, (D,), tg, tb, 1e-5) * torch.tensor(go)).sum().backward()
    for ours, theirs in zip(O.layer_norm_grads(go, x, gamma, 1e-5), (tx.grad, tg.grad, tb.grad), strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)
    for approximate, grad in (("none", O.gelu_exact_grad), ("tanh", O.gelu_tanh_grad)):
        ty = torch.tensor(x * 3, requires_grad=True)
        torch.nn.functional.gelu(ty, approximate=approximate).sum().backward()
        np.testing.assert_allclose(grad(x * 3), ty.grad.numpy(), rtol=1e-12, atol=1e-14)
    z = rng.standard_normal((R, V)) * 4
    labels = np.array([3, -100, 16, 0, -100])
    tz = torch.tensor(z, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(labels), ignore_index=-100)
    tl.backward()
    loss, grad = np.empty(R), np.empty_like(z)
    O.cross_entropy(loss, grad, z, labels, 1 / 3)
    np.testing.assert_allclose(loss.sum() / 3, tl.item(), rtol=1e-13)
    np.testing.assert_allclose(grad, tz.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_has_the_training_kernels(backend):
    blk = blocks(backend)
    for name in GELU_KERNELS + ("layer_norm_backward", "bias_backward", "linear_backward", "split_qkv_backward",
                                "merge_heads_backward", "cross_entropy"):  # fmt: skip
        assert callable(getattr(blk, name, None)), f"{backend} lacks {name}"


def test_linear_backward_matches_the_math(backend):
    rng = np.random.default_rng(6)
    x, w, go = rng.standard_normal((7, 5)), rng.standard_normal((5, 3)), rng.standard_normal((7, 3))
    gx, gw = np.empty_like(x), np.empty_like(w)
    blocks(backend).linear_backward(gx, gw, go, x, w)
    np.testing.assert_allclose(gx, go @ w.T, rtol=1e-13)
    np.testing.assert_allclose(gw, x.T @ go, rtol=1e-13)
