"""The Llama-family block kernels (RMSNorm, the SwiGLU product, q/k/v heads with RoPE, the decode-step matmul) on
every backend against the NumPy oracle (fastattn._numpy_blocks), float32 and float64, awkward sizes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check_against_oracle

from fastattn import _backends, _numpy_blocks

DTYPES = [np.float32, np.float64]


def blocks(backend):
    return _backends.kernels(backend, family="blocks")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D", [(1, 5), (7, 53), (3, 576), (0, 8)])
def test_rms_norm_kernels_match_oracle(backend, dtype, R, D):
    rng = np.random.default_rng(D)
    x, r = (rng.standard_normal((R, D)).astype(dtype) * 3 for _ in range(2))
    g = rng.standard_normal(D).astype(dtype)
    blk, eps = blocks(backend), 1e-6
    out = np.empty_like(x)
    blk.rms_norm(out, x, g, eps)
    check_against_oracle(out, lambda x_, g_: _numpy_blocks.rms_rows(x_, g_, eps), (x, g))
    total, normed = np.empty_like(x), np.empty_like(x)
    blk.add_rms_norm(total, normed, x, r, g, eps)
    check_against_oracle(total, lambda x_, r_: x_ + r_, (x, r))
    check_against_oracle(normed, lambda x_, r_, g_: _numpy_blocks.rms_rows(x_ + r_, g_, eps), (x, r, g))
    res = r.copy()  # out_sum may be the residual, as the models call it
    blk.add_rms_norm(res, normed, x, res, g, eps)
    np.testing.assert_array_equal(res, total)
    inplace = x.copy()  # out may be x (to the oracle's tolerance: Numba's float64 loop may vectorise differently)
    blk.rms_norm(inplace, inplace, g, eps)
    check_against_oracle(inplace, lambda x_, g_: _numpy_blocks.rms_rows(x_, g_, eps), (x, g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,F", [(1, 3), (5, 37), (2, 1536)])
def test_silu_mul_matches_oracle(backend, dtype, R, F):
    rng = np.random.default_rng(F)
    x = (rng.standard_normal((R, 2 * F)) * 4).astype(dtype)
    out = np.empty((R, F), dtype)
    blocks(backend).silu_mul(out, x)
    check_against_oracle(out, lambda x_: _numpy_blocks.silu(x_[:, :F]) * x_[:, F:], (x,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_extremes_and_nan(backend, dtype):
    g = np.array([[-1e30, -1e4, -100.0, -88.5, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.5, 100.0, 1e4, np.nan]], dtype)
    x = np.concatenate([g, np.ones_like(g)], axis=1)
    out = np.empty_like(g)
    blocks(backend).silu_mul(out, x)
    ref = _numpy_blocks.silu(g.astype(np.float64))
    assert np.isnan(out[0, -1]) and np.isfinite(out[0, :-1]).all()
    np.testing.assert_allclose(out[0, :-1], ref[0, :-1], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_norm", [False, True])
@pytest.mark.parametrize(
    "B,Hq,Hkv,L,d,T,offset", [(1, 4, 2, 3, 8, 9, 2), (2, 9, 3, 5, 64, 5, 0), (3, 2, 2, 1, 6, 4, 3)]
)
def test_split_qkv_rope_matches_oracle(backend, dtype, has_norm, B, Hq, Hkv, L, d, T, offset):
    rng = np.random.default_rng(B * 100 + d)
    qkv = rng.standard_normal((B, L, (Hq + 2 * Hkv) * d)).astype(dtype)
    bias = rng.standard_normal((Hq + 2 * Hkv) * d).astype(dtype)
    qg, kg = (rng.standard_normal(d).astype(dtype) for _ in range(2))
    angles = rng.uniform(0, 50, (B * L, d // 2))
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)

    def run(fn, *arrays):
        dt = arrays[0].dtype
        q = np.zeros((B, Hq, L, d), dt)
        k, v = np.zeros((B, Hkv, T, d), dt), np.zeros((B, Hkv, T, d), dt)
        qkv_, bias_, qg_, kg_, cos_, sin_ = arrays
        fn(q, k, v, qkv_, bias_, qg_, kg_, 1e-6, has_norm, cos_, sin_, offset)
        return q, k, v

    inputs = (qkv, bias, qg, kg, cos, sin)
    got = run(blocks(backend).split_qkv_rope, *inputs)
    for i in range(3):
        check_against_oracle(got[i], lambda *a, i=i: run(_numpy_blocks.split_qkv_rope, *a)[i], inputs)
    for a in got[1:]:  # only the cache rows offset .. offset + L - 1 are written
        assert not a[:, :, :offset].any() and not a[:, :, offset + L :].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,N", [(1, 576, 960), (8, 64, 37), (3, 17, 5), (16, 1536, 64), (2, 0, 4)])
def test_linear_matches_oracle(backend, dtype, T, K, N):
    rng = np.random.default_rng(T * K + N)
    x = rng.standard_normal((T, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)
    out = np.full((T, N), np.nan, dtype)
    blocks(backend).linear(out, x, w)
    check_against_oracle(out, lambda x_, w_: x_ @ w_.T, (x, w))
