"""Public API behaviour: names, backend selection, dtype rules, and every error message pinned."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import oracle

PUBLIC = [
    "embed",
    "sinusoidal_positions",
    "add_positions",
    "apply_rope",
    "scaled_dot_product_attention",
    "self_attention",
    "forward",
    "init_params",
    "Params",
    "available_backends",
    "use_backend",
    "set_num_threads",
    "get_num_threads",
    "warmup",
    "backend_status",
    "plan_info",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_have_runnable_docstrings(name):
    obj = getattr(fastattn, name)
    assert obj.__doc__ and ">>>" in obj.__doc__ or name == "Params"


def test_docstring_examples_run():
    import doctest

    import fastattn._backends
    import fastattn._threads
    import fastattn.functional
    import fastattn.model

    for mod in (fastattn.functional, fastattn.model, fastattn._backends, fastattn._threads):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, mod.__name__
        assert result.attempted > 0


def test_import_is_cheap_and_does_not_import_numba():
    code = "import sys, fastattn; assert 'numba' not in sys.modules, 'numba imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------ backends
def test_numpy_backend_always_available():
    assert "numpy" in fastattn.available_backends()
    assert fastattn.backend_status()["numpy"] is None


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*known backends are 'numpy', 'numba', 'cython'"):
        fastattn.embed([0], np.eye(2), backend="cuda")


def test_backend_argument_type():
    with pytest.raises(TypeError, match="backend must be a string"):
        fastattn.embed([0], np.eye(2), backend=3)


def test_unavailable_backend_says_why(monkeypatch):
    from fastattn import _backends

    monkeypatch.setitem(_backends._failed, "cython", "the extension was not built")
    with pytest.raises(ValueError, match=r"backend 'cython' .* is unavailable: the extension was not built"):
        fastattn.embed([0], np.eye(2), backend="cython")


def test_precedence_argument_context_environment(monkeypatch):
    from fastattn import _backends

    monkeypatch.setenv("FASTATTN_BACKEND", "numpy")
    assert _backends.resolve_name() == "numpy"
    monkeypatch.setenv("FASTATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable FASTATTN_BACKEND"):
        _backends.resolve_name()
    with fastattn.use_backend("numpy"):
        assert _backends.resolve_name() == "numpy"  # the context manager beats the environment
        other = fastattn.available_backends()[0]
        assert _backends.resolve_name(other) == other  # the argument beats the context manager
    monkeypatch.delenv("FASTATTN_BACKEND")
    assert _backends.resolve_name() == fastattn.available_backends()[0]


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with fastattn.use_backend("fast"):
            pass


def test_set_num_threads_validates_and_restores():
    before = fastattn.get_num_threads()
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        fastattn.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an integer"):
        fastattn.set_num_threads(1.5)
    with fastattn.set_num_threads(1):
        assert fastattn.get_num_threads() == 1
    assert fastattn.get_num_threads() == before


# ------------------------------------------------------------------------------------------------ dtypes
def test_float32_stays_float32(backend):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 8), dtype=np.float32)
    assert fastattn.scaled_dot_product_attention(q, q, q, backend=backend).dtype == np.float32
    assert fastattn.apply_rope(q, backend=backend).dtype == np.float32
    assert fastattn.embed([1, 0], np.eye(3, dtype=np.float32), backend=backend).dtype == np.float32


def test_mixed_dtypes_are_a_type_error():
    q32, q64 = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float64)
    with pytest.raises(TypeError, match=r"query.dtype=float32, key.dtype=float64"):
        fastattn.scaled_dot_product_attention(q32, q64, q64)
    with pytest.raises(TypeError, match=r"x.dtype=float32, positions.dtype=float64"):
        fastattn.add_positions(q32, np.zeros((3, 4)))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, 4), np.int64),
        np.zeros((3, 4), np.complex64),
        np.zeros((3, 4), np.float16),
        np.array([["a"]]),
        "text",
    ],
)
def test_non_float_inputs_are_type_errors(bad):
    with pytest.raises(TypeError, match="query must be a float32 or float64 array"):
        fastattn.scaled_dot_product_attention(bad, np.zeros((3, 4)), np.zeros((3, 4)))


def test_lists_are_accepted():
    out = fastattn.scaled_dot_product_attention([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0], [2.0]])
    assert out.shape == (1, 1) and out.dtype == np.float64


# ------------------------------------------------------------------------------------------------ errors
def test_embed_errors():
    table = np.eye(5, dtype=np.float32)
    with pytest.raises(IndexError, match=r"id -1, outside the vocabulary of size 5"):
        fastattn.embed([0, -1], table)
    with pytest.raises(IndexError, match=r"id 5, outside the vocabulary of size 5"):
        fastattn.embed([[5]], table)
    with pytest.raises(IndexError, match=r"id 9223372036854775807"):
        fastattn.embed(np.array([np.iinfo(np.int64).max]), table)
    with pytest.raises(
        TypeError, match=r"token_ids must be an integer array of token ids, got: token_ids.dtype=float64"
    ):
        fastattn.embed([0.0, 1.0], table)
    with pytest.raises(ValueError, match=r"table must have 2 dimensions, got shape \(5,\)"):
        fastattn.embed([0], np.ones(5))
    assert fastattn.embed(np.zeros((0,), dtype=int), table).shape == (0, 5)


def test_positions_errors():
    x = np.zeros((2, 6, 4), np.float32)
    pe = fastattn.sinusoidal_positions(8, 4)
    with pytest.raises(ValueError, match=r"positions has 8 rows but offset \+ N = 3 \+ 6 = 9 are needed"):
        fastattn.add_positions(x, pe, offset=3)
    with pytest.raises(ValueError, match=r"positions must have 4 columns"):
        fastattn.add_positions(x, fastattn.sinusoidal_positions(8, 5))
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        fastattn.add_positions(x, pe, offset=-1)
    with pytest.raises(ValueError, match="d_model must be >= 1, got 0"):
        fastattn.sinusoidal_positions(4, 0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastattn.sinusoidal_positions(4, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="apply_rope needs an even last dimension"):
        fastattn.apply_rope(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="base must be a finite positive number"):
        fastattn.apply_rope(np.zeros((3, 4)), base=-1.0)


def test_sdpa_errors():
    q = np.zeros((2, 4, 5, 8), np.float32)
    k = np.zeros((2, 4, 7, 8), np.float32)
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        fastattn.scaled_dot_product_attention(q, k, k, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal=True cannot be combined with attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, k, np.ones((5, 7), bool), is_causal=True)
    with pytest.raises(ValueError, match="share the last dimension E"):
        fastattn.scaled_dot_product_attention(q, k[..., :3], k)
    with pytest.raises(ValueError, match="share the sequence dimension S"):
        fastattn.scaled_dot_product_attention(q, k, k[..., :3, :])
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 6\) does not broadcast"):
        fastattn.scaled_dot_product_attention(q, k, k, np.ones((5, 6), bool))
    with pytest.raises(TypeError, match="attn_mask must be a boolean .* got: attn_mask.dtype=int64"):
        fastattn.scaled_dot_product_attention(q, k, k, np.ones((5, 7), np.int64))
    k3 = np.zeros((2, 3, 7, 8), np.float32)
    with pytest.raises(ValueError, match=r"enable_gqa needs the query heads \(4\) to be a multiple"):
        fastattn.scaled_dot_product_attention(q, k3, k3, enable_gqa=True)
    k2 = np.zeros((2, 2, 7, 8), np.float32)
    with pytest.raises(ValueError, match="heads must match .* unless enable_gqa=True"):
        fastattn.scaled_dot_product_attention(q, k2, k2)
    with pytest.raises(ValueError, match="do not broadcast"):
        fastattn.scaled_dot_product_attention(q, np.zeros((3, 4, 7, 8), np.float32), np.zeros((3, 4, 7, 8), np.float32))
    with pytest.raises(ValueError, match="query must have at least 2 dimensions"):
        fastattn.scaled_dot_product_attention(np.zeros(3), k, k)
    with pytest.raises(TypeError, match="is_causal must be True or False"):
        fastattn.scaled_dot_product_attention(q, k, k, is_causal="yes")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastattn.scaled_dot_product_attention(q, k, k, scale=float("nan"))


def test_self_attention_and_forward_errors():
    x = np.zeros((2, 5, 8), np.float32)
    w = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        fastattn.self_attention(x, w, w, w, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="w_q must have 8 rows"):
        fastattn.self_attention(x, np.zeros((7, 8), np.float32), w, w, n_heads=2)
    with pytest.raises(ValueError, match="w_k must have 4 columns"):
        fastattn.self_attention(x, w, w, w, n_heads=2, n_kv_heads=1)
    with pytest.raises(TypeError, match="w_v.dtype=float64 differs from x.dtype=float32"):
        fastattn.self_attention(x, w, w, w.astype(np.float64), n_heads=2)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, keys\) = \(2, 5\)"):
        fastattn.self_attention(x, w, w, w, n_heads=2, key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="n_heads must be >= 1, got 0"):
        fastattn.self_attention(x, w, w, w, n_heads=0)
    with pytest.raises(ValueError, match="rope has unknown keys"):
        fastattn.self_attention(x, w, w, w, n_heads=2, rope={"theta": 1.0})
    p = fastattn.init_params(10, 8, 2, max_positions=4)
    with pytest.raises(ValueError, match="token_ids has 5 tokens but params.positions has only 4 rows"):
        fastattn.forward(np.zeros((1, 5), int), p)
    with pytest.raises(IndexError, match="id 10, outside the vocabulary of size 10"):
        fastattn.forward(np.array([[1, 10]]), p)
    with pytest.raises(TypeError, match="params must be a fastattn.Params"):
        fastattn.forward(np.array([[1]]), {"embedding": None})
    with pytest.raises(ValueError, match=r"d_model \(10\) must be a multiple of n_heads \(4\)"):
        fastattn.init_params(10, 10, 4, max_positions=4)


def test_library_still_works_after_errors(backend):
    with pytest.raises(IndexError):
        fastattn.embed([7], np.eye(3), backend=backend)
    assert fastattn.embed([2], np.eye(3), backend=backend).tolist() == [[0.0, 0.0, 1.0]]


# ------------------------------------------------------------------------------------------------ semantics
def test_empty_inputs(backend):
    q = np.zeros((2, 0, 8), np.float32)
    assert fastattn.scaled_dot_product_attention(q, q, q, backend=backend).shape == (2, 0, 8)
    k = np.zeros((2, 0, 8), np.float32)
    out = fastattn.scaled_dot_product_attention(np.ones((2, 3, 8), np.float32), k, k, backend=backend)
    np.testing.assert_array_equal(out, np.zeros((2, 3, 8)))
    p = fastattn.init_params(10, 8, 2, max_positions=4)
    assert fastattn.forward(np.zeros((0, 3), int), p, backend=backend).shape == (0, 3, 8)
    assert fastattn.forward(np.zeros((2, 0), int), p, backend=backend).shape == (2, 0, 8)


def test_self_attention_2d_and_no_output_projection(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8))
    w = [rng.standard_normal((8, 8)) for _ in range(3)]
    got = fastattn.self_attention(x, *w, n_heads=2, backend=backend)
    ref = oracle.self_attention(x[None], *w, n_heads=2)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_float_key_padding_mask_is_added(backend):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 8))
    w = [rng.standard_normal((8, 8)) for _ in range(3)]
    bias = rng.standard_normal((2, 5))
    got = fastattn.self_attention(x, *w, n_heads=2, key_padding_mask=bias, backend=backend)
    np.testing.assert_allclose(got, oracle.self_attention(x, *w, n_heads=2, key_padding_mask=bias), rtol=1e-10)
    boolean = np.array([[False] * 5, [False, False, False, True, True]])
    got = fastattn.self_attention(x, *w, n_heads=2, key_padding_mask=boolean, backend=backend)
    np.testing.assert_allclose(got, oracle.self_attention(x, *w, n_heads=2, key_padding_mask=boolean), rtol=1e-10)


def test_env_backend_in_subprocess():
    env = dict(os.environ, FASTATTN_BACKEND="numpy")
    code = "import fastattn; from fastattn import _backends; print(_backends.resolve_name())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "numpy"


def test_demo_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fastattn", "demo", "--repeats", "2"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "attention of 'black'" in out.stdout
    assert "numpy" in out.stdout
