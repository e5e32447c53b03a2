"""Against PyTorch's scaled_dot_product_attention (CPU), where PyTorch is installed (CI installs torch==2.13.0)."""

import numpy as np
import pytest

import fastattn

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_sdpa(q, k, v, mask=None, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v)]
    m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
    return F.scaled_dot_product_attention(*t, attn_mask=m, **kw).numpy()


def tol(dtype):
    return dict(rtol=1e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-11)


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (5, 12), (12, 5), (64, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_plain_and_causal(backend, dtype, L, S, causal):
    rng = np.random.default_rng(L + 100 * S)
    q, k, v = rand(rng, (2, 3, L, 16), dtype), rand(rng, (2, 3, S, 16), dtype), rand(rng, (2, 3, S, 24), dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    np.testing.assert_allclose(got, torch_sdpa(q, k, v, is_causal=causal), **tol(dtype))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", [(9, 11), (2, 1, 9, 11), (1, 3, 1, 11), (1, 11)])
def test_matches_torch_masks(backend, kind, mshape):
    rng = np.random.default_rng(3)
    q, k, v = (
        rand(rng, (2, 3, 9, 8), np.float32),
        rand(rng, (2, 3, 11, 8), np.float32),
        rand(rng, (2, 3, 11, 8), np.float32),
    )
    mask = rng.random(mshape) > 0.3 if kind == "bool" else rand(rng, mshape, np.float32)
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    np.testing.assert_allclose(got, torch_sdpa(q, k, v, mask), **tol(np.float32))


def test_matches_torch_fully_masked_rows_give_zeros(backend):
    rng = np.random.default_rng(4)
    q, k, v = (
        rand(rng, (1, 2, 4, 8), np.float32),
        rand(rng, (1, 2, 6, 8), np.float32),
        rand(rng, (1, 2, 6, 8), np.float32),
    )
    mask = rng.random((1, 2, 4, 6)) > 0.5
    mask[0, 1, 2] = False
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    ref = torch_sdpa(q, k, v, mask)
    np.testing.assert_allclose(got, np.nan_to_num(ref), **tol(np.float32))
    np.testing.assert_array_equal(got[0, 1, 2], 0.0)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_gqa(backend, Hq, Hkv, causal):
    rng = np.random.default_rng(Hq + Hkv)
    q, k, v = (
        rand(rng, (2, Hq, 10, 16), np.float32),
        rand(rng, (2, Hkv, 13, 16), np.float32),
        rand(rng, (2, Hkv, 13, 8), np.float32),
    )
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend=backend)
    np.testing.assert_allclose(got, torch_sdpa(q, k, v, is_causal=causal, enable_gqa=True), **tol(np.float32))


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_matches_torch_scale(backend, scale):
    rng = np.random.default_rng(5)
    q, k, v = (rand(rng, (3, 9, 16), np.float64) for _ in range(3))
    got = fastattn.scaled_dot_product_attention(q, k, v, scale=scale, backend=backend)
    np.testing.assert_allclose(got, torch_sdpa(q, k, v, scale=scale), **tol(np.float64))


def test_matches_torch_broadcast_batch(backend):
    rng = np.random.default_rng(6)
    q, k, v = (
        rand(rng, (4, 2, 5, 8), np.float64),
        rand(rng, (1, 2, 7, 8), np.float64),
        rand(rng, (1, 2, 7, 8), np.float64),
    )
    got = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    kb, vb = np.broadcast_to(k, (4, 2, 7, 8)), np.broadcast_to(v, (4, 2, 7, 8))
    np.testing.assert_allclose(got, torch_sdpa(q, kb, vb), **tol(np.float64))


def test_self_attention_matches_torch_multihead(backend):
    """nn.MultiheadAttention's Linear weights are the transpose of fastattn's x @ w convention."""
    torch.manual_seed(0)
    D, H = 32, 4
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64)
    x = np.random.default_rng(7).standard_normal((2, 9, D))
    pad = np.zeros((2, 9), dtype=bool)
    pad[1, 6:] = True
    causal = np.triu(np.ones((9, 9), dtype=bool), 1)
    xt = torch.from_numpy(x)
    ref, _ = mha(
        xt, xt, xt, key_padding_mask=torch.from_numpy(pad), attn_mask=torch.from_numpy(causal), need_weights=False
    )
    w_in, b_in = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    got = fastattn.self_attention(
        x,
        w_in[:D].T,
        w_in[D : 2 * D].T,
        w_in[2 * D :].T,
        mha.out_proj.weight.detach().numpy().T,
        b_q=b_in[:D],
        b_k=b_in[D : 2 * D],
        b_v=b_in[2 * D :],
        b_o=mha.out_proj.bias.detach().numpy(),
        n_heads=H,
        is_causal=True,
        key_padding_mask=pad,
        backend=backend,
    )
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-9, atol=1e-11)
