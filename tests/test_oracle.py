"""The oracle against independent facts: it is the truth every backend is held to, so it is tested first."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastattn import oracle

rng = np.random.default_rng(1234)


def test_one_hot_product_equals_gather():
    table = rng.standard_normal((11, 5))
    ids = rng.integers(0, 11, size=(3, 7))
    hot = oracle.one_hot(ids, 11)
    assert hot.shape == (3, 7, 11)
    assert np.array_equal(hot.sum(axis=-1), np.ones((3, 7)))
    np.testing.assert_array_equal(oracle.embed(ids, table), table[ids])


def test_softmax_rows_sum_to_one_and_are_shift_invariant():
    s = rng.standard_normal((4, 9)) * 30
    p = oracle.softmax(s)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(oracle.softmax(s + 1000.0), p, rtol=1e-12)
    assert np.all(p >= 0)


def test_softmax_of_all_minus_inf_row_is_zeros():
    s = np.array([[0.0, 1.0], [-np.inf, -np.inf]])
    p = oracle.softmax(s)
    np.testing.assert_array_equal(p[1], [0.0, 0.0])
    np.testing.assert_allclose(p[0], [1 / (1 + np.e), np.e / (1 + np.e)])


def test_identical_keys_give_the_mean_of_the_values():
    q = rng.standard_normal((2, 6, 8))
    k = np.repeat(rng.standard_normal((2, 1, 8)), 5, axis=1)  # five identical keys
    v = rng.standard_normal((2, 5, 3))
    out = oracle.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), rtol=1e-12)


def test_causal_first_row_is_the_first_value():
    q, k, v = (rng.standard_normal((3, 7, 4)) for _ in range(3))
    out = oracle.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-12)


def test_causal_last_row_equals_unmasked_last_row():
    q, k, v = (rng.standard_normal((5, 4)) for _ in range(3))
    causal = oracle.scaled_dot_product_attention(q, k, v, is_causal=True)
    full = oracle.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(causal[-1], full[-1], rtol=1e-12)


def test_attention_matches_explicit_loops():
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    out = np.zeros((3, 2))
    for i in range(3):
        w = np.array([np.exp(q[i] @ k[j] / 2.0) for j in range(5)])
        out[i] = (w / w.sum()) @ v
    np.testing.assert_allclose(oracle.scaled_dot_product_attention(q, k, v), out, rtol=1e-12)


def test_gqa_equals_repeated_heads():
    q = rng.standard_normal((2, 6, 5, 4))
    k, v = rng.standard_normal((2, 2, 7, 4)), rng.standard_normal((2, 2, 7, 3))
    out = oracle.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for h in range(6):
        ref = oracle.scaled_dot_product_attention(q[:, h], k[:, h // 3], v[:, h // 3])
        np.testing.assert_allclose(out[:, h], ref, rtol=1e-12)


def test_sinusoidal_known_values():
    pe = oracle.sinusoidal_positions(50, 8)
    np.testing.assert_array_equal(pe[0], [0, 1, 0, 1, 0, 1, 0, 1])
    assert pe[1, 0] == pytest.approx(np.sin(1.0))
    assert pe[1, 1] == pytest.approx(np.cos(1.0))
    assert pe[7, 2] == pytest.approx(np.sin(7 / 10000 ** (2 / 8)))
    assert pe[7, 7] == pytest.approx(np.cos(7 / 10000 ** (6 / 8)))
    assert oracle.sinusoidal_positions(10, 4, base=100.0)[3, 2] == pytest.approx(np.sin(3 / 100**0.5))


def test_sinusoidal_odd_width_ends_with_a_sine():
    pe = oracle.sinusoidal_positions(5, 7)
    assert pe.shape == (5, 7)
    np.testing.assert_allclose(pe[:, 6], np.sin(np.arange(5) / 10000 ** (6 / 7)))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_keeps_norms(interleaved):
    x = rng.standard_normal((3, 11, 16))
    y = oracle.apply_rope(x, offset=5, interleaved=interleaved)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(oracle.apply_rope(x, interleaved=interleaved)[:, 0], x[:, 0])


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 500), interleaved=st.booleans())
def test_rope_inner_product_depends_only_on_distance(m, n, shift, interleaved):
    q, k = np.random.default_rng(m * 1000 + n).standard_normal((2, 1, 8))

    def at(x, pos):
        return oracle.apply_rope(x, offset=pos, interleaved=interleaved)[0]

    a = at(q, m) @ at(k, n)
    b = at(q, m + shift) @ at(k, n + shift)
    assert a == pytest.approx(b, rel=1e-9, abs=1e-9)


def test_rope_layouts_are_a_permutation_of_each_other():
    x = rng.standard_normal((4, 8))
    perm = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # half layout column i pairs with i + 4; interleaved with 2i + 1
    half = oracle.apply_rope(x, offset=3)
    inter = oracle.apply_rope(x[:, perm], offset=3, interleaved=True)
    np.testing.assert_allclose(inter, half[:, perm], rtol=1e-12)


def test_rope_rotates_the_first_pair_by_the_position():
    x = np.zeros((3, 4))
    x[:, 0] = 1.0  # unit vector in the first pair (0, 2) of the half layout
    y = oracle.apply_rope(x)
    np.testing.assert_allclose(y[:, 0], np.cos(np.arange(3)))
    np.testing.assert_allclose(y[:, 2], np.sin(np.arange(3)))


def test_boolean_and_additive_masks_agree():
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    keep = rng.random((2, 5, 5)) > 0.3
    keep[..., 0] = True
    add = np.where(keep, 0.0, -np.inf)
    np.testing.assert_allclose(
        oracle.scaled_dot_product_attention(q, k, v, keep), oracle.scaled_dot_product_attention(q, k, v, add)
    )
