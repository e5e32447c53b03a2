"""fastattn.models: block kernels against their oracle, and real checkpoints against Hugging Face transformers.

Block kernels run on every backend at float32 and float64 (tolerances: conftest.check_against_oracle). Models are
small random BERT / RoBERTa / GPT-2 built with transformers, saved with ``save_pretrained(safe_serialization=True)``
and loaded back with ``fastattn.models.load``: hidden states, pooled embeddings and logits agree with transformers to
1e-5 of their scale in float32 (1e-10 in float64), on every backend, with and without padding; greedy generations
are identical. The model tests need transformers, torch and safetensors (CI installs them) and skip without.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS, COMPILED, check_against_oracle

import fastattn
import fastattn.models
from fastattn import _backends, _numpy_blocks

KERNEL_DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def blocks(backend):
    return _backends.kernels(backend, family="blocks")


# --------------------------------------------------------------------------------------------------------------
# Block kernels against the oracle
# --------------------------------------------------------------------------------------------------------------
def assert_same(got, want):
    """Equal up to a few ulps: two kernels of one backend may round (fuse, reassociate) differently."""
    np.testing.assert_allclose(got, want, rtol=8 * np.finfo(want.dtype).eps, atol=8 * np.finfo(want.dtype).eps)


def _rows(rng, dtype, R=37, D=53, scale=3.0):
    return (rng.standard_normal((R, D)) * scale).astype(dtype)


ELEMENTWISE = {
    "gelu": lambda x, b: _numpy_blocks.gelu_exact(x),
    "gelu_tanh": lambda x, b: _numpy_blocks.gelu_tanh_form(x),
    "bias_gelu": lambda x, b: _numpy_blocks.gelu_exact(x + b),
    "bias_gelu_tanh": lambda x, b: _numpy_blocks.gelu_tanh_form(x + b),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("D", [7, 53, 384])
def test_gelu_kernels_match_oracle(backend, dtype, name, D):
    rng = np.random.default_rng(D)
    x, b = _rows(rng, dtype, D=D), rng.standard_normal(D).astype(dtype)
    out = np.empty_like(x)
    args = (x,) if name in ("gelu", "gelu_tanh") else (x, b)
    getattr(blocks(backend), name)(out, *args)
    check_against_oracle(out, ELEMENTWISE[name], (x, b))
    inplace = x.copy()  # out may be x
    getattr(blocks(backend), name)(inplace, inplace, *args[1:])
    np.testing.assert_array_equal(inplace, out)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_extremes_and_nan(backend, dtype, name):
    x = np.array([[-1e30, -1e4, -50.0, -9.0, -4.0, -1e-30, 0.0, 1e-30, 4.0, 9.0, 50.0, 1e4, 1e30, np.nan]], dtype)
    out = np.empty_like(x)
    getattr(blocks(backend), name)(out, x)
    ref = ELEMENTWISE[name](x.astype(np.float64), None)
    assert np.isnan(out[0, -1])
    np.testing.assert_allclose(out[0, :-1], ref[0, :-1], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("D", [5, 53, 384])
def test_layer_norm_kernels_match_oracle(backend, dtype, D):
    rng = np.random.default_rng(D)
    x, r = _rows(rng, dtype, D=D) + 5, _rows(rng, dtype, D=D)
    b, g, beta = (rng.standard_normal(D).astype(dtype) for _ in range(3))
    blk = blocks(backend)
    eps = 1e-5

    out = np.empty_like(x)
    blk.layer_norm(out, x, g, beta, eps)
    check_against_oracle(out, lambda x_, g_, b_: _numpy_blocks.layer_norm_rows(x_, g_, b_, eps), (x, g, beta))

    blk.bias_residual_layer_norm(out, x, b, r, g, beta, eps)
    check_against_oracle(
        out, lambda x_, bb, r_, g_, b_: _numpy_blocks.layer_norm_rows(x_ + bb + r_, g_, b_, eps), (x, b, r, g, beta)
    )
    total, normed = np.empty_like(x), np.empty_like(x)
    blk.bias_residual_and_layer_norm(total, normed, x, b, r, g, beta, eps)
    check_against_oracle(total, lambda x_, bb, r_: x_ + bb + r_, (x, b, r))
    assert_same(normed, out)

    summed = np.empty_like(x)
    blk.bias_residual(summed, x, b, r)
    assert_same(summed, total)

    # in place: out may be the residual (post-LN) and out_sum the residual (pre-LN), as the models call them
    res = r.copy()
    blk.bias_residual_layer_norm(res, x, b, res, g, beta, eps)
    assert_same(res, out)
    res = r.copy()
    blk.bias_residual_and_layer_norm(res, normed, x, b, res, g, beta, eps)
    assert_same(res, total)


def test_layer_norm_constant_rows_and_large_offsets(backend):
    x = np.full((3, 64), 1000.0, np.float32)
    x[1] += np.linspace(-1, 1, 64, dtype=np.float32)
    g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    out = np.empty_like(x)
    blocks(backend).layer_norm(out, x, g, b, 1e-12)
    ref = _numpy_blocks.layer_norm_rows(x.astype(np.float64), g, b, 1e-12)
    np.testing.assert_allclose(out, ref, atol=2e-3)  # 1000 ± 1 in float32 carries ~6e-5 of rounding per input
    assert np.all(out[0] == 0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("has_types", [False, True])
def test_embedding_kernel(backend, dtype, has_types):
    rng = np.random.default_rng(1)
    V, P, Tv, D, T = 31, 17, 3, 13, 29
    table, pos, types = (rng.standard_normal((n, D)).astype(dtype) for n in (V, P, Tv))
    ids, pids, tids = rng.integers(0, V, T), rng.integers(0, P, T), rng.integers(0, Tv, T)
    out = np.empty((T, D), dtype)
    blocks(backend).embedding(out, ids, table, pids, pos, tids, types, has_types)
    ref = table[ids] + pos[pids] + (types[tids] if has_types else 0)
    np.testing.assert_allclose(out, ref, rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_split_qkv_and_merge_heads(backend, dtype):
    rng = np.random.default_rng(2)
    B, H, L, d, T, offset = 2, 3, 5, 7, 11, 4
    qkv = rng.standard_normal((B, L, 3 * H * d)).astype(dtype)
    bias = rng.standard_normal(3 * H * d).astype(dtype)
    q = np.empty((B, H, L, d), dtype)
    k, v = np.zeros((B, H, T, d), dtype), np.zeros((B, H, T, d), dtype)
    blocks(backend).split_qkv(q, k, v, qkv, bias, offset)
    y = (qkv + bias).reshape(B, L, 3, H, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, L, d)
    np.testing.assert_array_equal(q, y[0])
    np.testing.assert_array_equal(k[:, :, offset : offset + L], y[1])
    np.testing.assert_array_equal(v[:, :, offset : offset + L], y[2])
    assert not k[:, :, :offset].any() and not v[:, :, offset + L :].any()  # nothing else written
    merged = np.empty((B, L, H * d), dtype)
    blocks(backend).merge_heads(merged, q)
    np.testing.assert_array_equal(merged, (qkv + bias)[..., : H * d])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "B,N,K,F,lengths",
    [(5, 13, 7, 9, [13, 0, 5, 1, 12]), (3, 40, 48, 144, [40, 17, 33]), (2, 9, 0, 4, [9, 3]), (1, 128, 384, 1536, [99])],
)
def test_text_matmul_matches_oracle(backend, dtype, B, N, K, F, lengths):
    rng = np.random.default_rng(B * N + K)
    x = rng.standard_normal((B, N, K)).astype(dtype)
    w = rng.standard_normal((K, F)).astype(dtype)
    lengths = np.array(lengths, np.int64)
    x_before = x.copy()
    out = np.full((B, N, F), np.nan, dtype)
    blocks(backend).text_matmul(out, x, w, lengths)
    real = np.arange(N) < lengths[:, None]  # (B, N): the rows each sequence has
    assert np.isnan(out[~real]).all()  # the padded rows are left as they were

    def oracle(x_, w_):
        want = np.full(out.shape, np.nan, x_.dtype)
        _numpy_blocks.text_matmul(want, x_, w_, lengths)
        return want[real]

    check_against_oracle(out[real], oracle, (x, w))
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_text_matmul_bits_are_each_sequence_own(compiled_backend, dtype):
    """A sequence's rows have the same bits alone, in a batch of others, padded longer, on 1 or 2 threads."""
    rng = np.random.default_rng(5)
    K, F = 64, 96
    w = rng.standard_normal((K, F)).astype(dtype)
    seqs = [rng.standard_normal((n, K)).astype(dtype) for n in (1, 7, 30, 64, 65)]
    alone = []
    for s in seqs:
        out = np.empty((1, len(s), F), dtype)
        blocks(compiled_backend).text_matmul(out, s[None], w, np.array([len(s)], np.int64))
        alone.append(out[0])
    for threads, N in ((1, 65), (2, 70), (2, 128)):
        x = np.zeros((len(seqs), N, K), dtype)
        for b, s in enumerate(seqs[::-1]):
            x[b, : len(s)] = s
        out = np.empty((len(seqs), N, F), dtype)
        with fastattn.set_num_threads(threads):
            blocks(compiled_backend).text_matmul(out, x, w, np.array([len(s) for s in seqs[::-1]], np.int64))
        for b, s in enumerate(seqs[::-1]):
            np.testing.assert_array_equal(out[b, : len(s)], alone[len(seqs) - 1 - b])


def test_block_kernel_modules_share_one_contract():
    names = [n for n in _numpy_blocks.__all__ if n not in ("get_num_threads", "set_num_threads")]
    for backend in BACKENDS:
        mod = blocks(backend)
        missing = [n for n in names if not callable(getattr(mod, n, None))]
        assert not missing, f"{backend} block kernels lack {missing}"


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not available")
def test_numba_blocks_use_the_shared_fastmath_flags():
    import importlib.util

    source = open(importlib.util.find_spec("fastattn.kernels.numba.blocks").origin, encoding="utf-8").read()
    assert "fastmath=" not in source and "PARALLEL" in source and "HELPER" in source


# --------------------------------------------------------------------------------------------------------------
# Real checkpoints against transformers
# --------------------------------------------------------------------------------------------------------------
SCALE_RTOL = {np.float32: 1e-5, np.float64: 1e-10}


def assert_close_to_scale(got, ref, dtype=np.float32, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    err = float(np.abs(got - ref).max(initial=0.0))
    assert err <= SCALE_RTOL[dtype] * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def _vocab_words(n):
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = (
        "the a dog cat chased black white garden through over quick brown fox jumps lazy sat on mat "
        "red blue green sky is was and or not very small big house tree car road"
    ).split()
    vocab = special + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(n - len(vocab))]
    return {w: i for i, w in enumerate(vocab[:n])}


def _save_bert_tokenizer(directory, vocab):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(os.path.join(directory, "tokenizer.json"))


@pytest.fixture(scope="module")
def bert(hf, tmp_path_factory):
    """(directory, transformers model): a 2-layer BERT with a tokenizer and sentence-transformers files."""
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=40,
        type_vocab_size=2,
        initializer_range=0.2,
        hidden_act="gelu",
    )
    model = transformers.BertModel(config).eval()
    directory = str(tmp_path_factory.mktemp("bert"))
    model.save_pretrained(directory, safe_serialization=True)
    _save_bert_tokenizer(directory, _vocab_words(config.vocab_size))
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
            f,
        )
    os.makedirs(os.path.join(directory, "1_Pooling"))
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump(
            {
                "word_embedding_dimension": 48,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_cls_token": False,
                "pooling_mode_max_tokens": False,
            },
            f,
        )
    return directory, model


@pytest.fixture(scope="module")
def gpt2(hf, tmp_path_factory):
    """(directory, transformers model): a 2-layer GPT-2 with its tied LM head."""
    torch, transformers = hf
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=150,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        bos_token_id=149,
        eos_token_id=149,
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = str(tmp_path_factory.mktemp("gpt2"))
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def _torch_run(hf, fn):
    torch, _ = hf
    with torch.no_grad():
        return fn(torch)


def _batch(rng, B, N, vocab, padding, *, left=False):
    ids = rng.integers(5, vocab, (B, N))
    mask = np.ones((B, N), np.int64)
    if padding:
        for b, n in enumerate([N, N - 3, 2][:B]):
            if left:
                mask[b, : N - n] = 0
            else:
                mask[b, n:] = 0
        ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("padding", [False, True], ids=["full", "padded"])
def test_bert_hidden_states_match_transformers(hf, bert, backend, padding):
    directory, ref_model = bert
    model = fastattn.models.load(directory, backend=backend)
    rng = np.random.default_rng(3)
    ids, mask = _batch(rng, 3, 13, 120, padding)
    types = (rng.random((3, 13)) < 0.4).astype(np.int64)
    out = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = _torch_run(
        hf,
        lambda t: ref_model(
            t.from_numpy(ids),
            attention_mask=t.from_numpy(mask),
            token_type_ids=t.from_numpy(types),
            output_hidden_states=True,
        ),
    )
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close_to_scale(got, want.numpy(), what=f"hidden state {i}")
    assert_close_to_scale(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last")
    assert_close_to_scale(out.pooler_output, ref.pooler_output.numpy(), what="pooler")
    assert out.last_hidden_state.dtype == np.float32
    assert model(ids, attention_mask=mask, token_type_ids=types).hidden_states is None


def test_bert_float64_matches_transformers_closely(hf, bert, backend):
    directory, ref_model = bert
    model = fastattn.models.load(directory, backend=backend, dtype=np.float64)
    ids, mask = _batch(np.random.default_rng(4), 3, 9, 120, True)
    out = model(ids, attention_mask=mask)
    ref = _torch_run(hf, lambda t: ref_model.double()(t.from_numpy(ids), attention_mask=t.from_numpy(mask)))
    ref_model.float()
    assert out.last_hidden_state.dtype == np.float64
    assert_close_to_scale(out.last_hidden_state, ref.last_hidden_state.numpy(), np.float64)


def _mean_pool_normalise(hidden, mask):
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def test_sentence_embeddings_match_transformers(hf, bert, backend):
    directory, ref_model = bert
    model = fastattn.models.load(directory, backend=backend)
    assert (model.pooling.mode, model.pooling.normalize) == ("mean", True)  # from modules.json
    ids, mask = _batch(np.random.default_rng(5), 3, 11, 120, True)
    emb = model.encode(ids, attention_mask=mask)
    ref = _torch_run(hf, lambda t: ref_model(t.from_numpy(ids), attention_mask=t.from_numpy(mask)))
    want = _mean_pool_normalise(ref.last_hidden_state.numpy(), mask)
    assert_close_to_scale(emb, want, what="embeddings")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
    cls = model.encode(ids, attention_mask=mask, pooling="cls", normalize=False)
    assert_close_to_scale(cls, ref.last_hidden_state.numpy()[:, 0], what="cls")


TEXTS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat", "red sky", "the dogs chased cats"]


def test_text_embeddings_match_transformers(hf, bert, backend):
    from tokenizers import Tokenizer

    directory, ref_model = bert
    model = fastattn.models.load(directory, backend=backend)
    emb = model.encode(TEXTS, batch_size=3)  # sorted by length, two batches, put back in order
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    for text, row in zip(TEXTS, emb, strict=True):
        ids = np.array([tok.encode(text).ids])
        ref = _torch_run(hf, lambda t, ids=ids: ref_model(t.from_numpy(ids)))
        want = _mean_pool_normalise(ref.last_hidden_state.numpy(), np.ones(ids.shape))[0]
        assert_close_to_scale(row, want, what=text)
    single = model.encode(TEXTS[2])
    assert single.shape == (48,)
    assert_close_to_scale(single, emb[2])


def test_embed_command_prints_the_embedding(hf, bert, capsys):
    from fastattn.__main__ import main

    directory, _ = bert
    assert main(["embed", "--model", directory, "--backend", "numpy", TEXTS[0], TEXTS[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = np.array([[float(x) for x in line.split()] for line in lines])
    want = fastattn.models.load(directory, backend="numpy").encode(TEXTS[:2])
    np.testing.assert_allclose(printed, want, atol=1e-6)
    assert main(["embed", "--model", directory, "--ids", "--format", "json", "2 7 8 3"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 48
    assert main(["embed", "--model", os.path.join(directory, "nope"), "text"]) == 1
    assert "no model directory" in capsys.readouterr().err


def test_roberta_positions_match_transformers(hf, tmp_path, backend):
    torch, transformers = hf
    torch.manual_seed(2)
    config = transformers.RobertaConfig(
        vocab_size=90,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=24,
        type_vocab_size=1,
        pad_token_id=1,
        initializer_range=0.2,
    )
    ref_model = transformers.RobertaModel(config).eval()
    ref_model.save_pretrained(tmp_path, safe_serialization=True)
    model = fastattn.models.load(tmp_path, backend=backend)
    ids, mask = _batch(np.random.default_rng(6), 3, 10, 90, True)
    ids[mask == 0] = 1
    out = model(ids, attention_mask=mask)
    ref = _torch_run(hf, lambda t: ref_model(t.from_numpy(ids), attention_mask=t.from_numpy(mask)))
    assert_close_to_scale(out.last_hidden_state, ref.last_hidden_state.numpy())


@pytest.mark.parametrize("padding", [False, True], ids=["full", "padded"])
def test_gpt2_logits_match_transformers(hf, gpt2, backend, padding):
    directory, ref_model = gpt2
    model = fastattn.models.load(directory, backend=backend)
    assert isinstance(model, fastattn.models.GPT2Model)
    ids, mask = _batch(np.random.default_rng(7), 3, 12, 150, padding)
    out = model(ids, attention_mask=mask)
    ref = _torch_run(hf, lambda t: ref_model(t.from_numpy(ids), attention_mask=t.from_numpy(mask)))
    real = mask.astype(bool)  # the logits at padding positions are not defined the same way
    assert_close_to_scale(out.logits[real], ref.logits.numpy()[real], what="logits")
    assert out.logits.shape == (3, 12, 150) and out.past.length == 12


def test_gpt2_float64_matches_transformers_closely(hf, gpt2, backend):
    directory, ref_model = gpt2
    model = fastattn.models.load(directory, backend=backend, dtype="float64")
    ids = np.random.default_rng(8).integers(0, 150, (2, 10))
    out = model(ids)
    ref = _torch_run(hf, lambda t: ref_model.double()(t.from_numpy(ids)))
    ref_model.float()
    assert_close_to_scale(out.logits, ref.logits.numpy(), np.float64)


def test_gpt2_cache_continues_a_forward_pass(gpt2, backend):
    directory, _ = gpt2
    model = fastattn.models.load(directory, backend=backend)
    ids = np.random.default_rng(9).integers(0, 150, (2, 14))
    full = model(ids).logits
    first = model(ids[:, :9])
    step = model(ids[:, 9:12], past=first.past)  # three tokens at once after nine cached
    last = model(ids[:, 12:], past=step.past)  # the cache grows beyond its first capacity
    assert_close_to_scale(np.concatenate([first.logits, step.logits, last.logits], axis=1), full)
    assert last.past.length == 14


@pytest.mark.parametrize("padding", [False, True], ids=["full", "left-padded"])
def test_gpt2_greedy_generation_matches_transformers(hf, gpt2, backend, padding):
    directory, ref_model = gpt2
    model = fastattn.models.load(directory, backend=backend)
    ids, mask = _batch(np.random.default_rng(10), 3, 8, 149, padding, left=True)
    out = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    ref = _torch_run(
        hf,
        lambda t: ref_model.generate(
            t.from_numpy(ids), attention_mask=t.from_numpy(mask), max_new_tokens=12, do_sample=False
        ),
    )
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    np.testing.assert_array_equal(np.asarray(out), out.sequences)
    assert out.new_tokens == 12 and out.tokens_per_second > 0 and out.decode_tokens_per_second > 0


def test_gpt2_generation_stops_at_eos_like_transformers(hf, gpt2, backend):
    directory, ref_model = gpt2
    model = fastattn.models.load(directory, backend=backend)
    ids = np.random.default_rng(11).integers(0, 149, (2, 6))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free.sequences[0, 6 + 2])  # row 0 meets this id at its third new token
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    ref = _torch_run(
        hf,
        lambda t: ref_model.generate(
            t.from_numpy(ids), max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0
        ),
    )
    np.testing.assert_array_equal(out.sequences, ref.numpy())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n", [1, 5, 17, 40, 100, 530])
def test_attention_of_a_padded_sequence_has_its_own_bits(compiled_backend, dtype, n):
    """The fused kernel's real rows for a sequence of n tokens are bitwise the same padded to any length (key bias
    -inf on the padding) and in any batch: no key's score or weight depends on how many keys follow it."""
    from fastattn import _call

    kern = _backends.kernels(compiled_backend)
    rng = np.random.default_rng(n)
    H, d = 4, 12
    q, k, v = (rng.standard_normal((H, n, d)).astype(dtype) for _ in range(3))

    def run(N, B, b):
        Q, K, V = (rng.standard_normal((B, H, N, d)).astype(dtype) for _ in range(3))  # other sequences: noise
        bias = np.where(rng.random((B, N)) < 0.3, -np.inf, 0.0).astype(dtype)
        Q[b, :, :n], K[b, :, :n], V[b, :, :n] = q, k, v
        bias[b, :n], bias[b, n:] = 0, -np.inf
        out = np.empty_like(Q)
        _call.attention_into(kern, out, Q, K, V, 1 / np.sqrt(d), False, 0, None, bias)
        return out[b, :, :n]

    alone = run(n, 1, 0)
    for N, B, b in [(n + 1, 1, 0), (n + 15, 2, 1), (n + 64, 3, 0), (max(n, 128) + 3, 5, 4)]:
        np.testing.assert_array_equal(run(N, B, b), alone, err_msg=f"padded to {N}, sequence {b} of {B}")


def test_a_text_embedding_has_the_same_bits_in_any_batch(bert, compiled_backend):
    """encode's rows depend on their own text only: not on the batch it is sorted into, its padded length, the
    batch size, the thread count, or the call it came in (fastattn.models.dask relies on it)."""
    model = fastattn.models.load(bert[0], backend=compiled_backend)
    rng = np.random.default_rng(8)
    words = [w for w in _vocab_words(120) if w.isalpha()]
    texts = [" ".join(rng.choice(words, rng.integers(1, 45))) for _ in range(90)]  # 3 .. 40 tokens (truncated)
    whole = model.encode(texts)
    for batch_size, threads, cuts in ((1, 1, []), (7, 2, [20, 21, 60]), (64, 1, [45]), (90, 2, [])):
        with fastattn.set_num_threads(threads):
            parts = np.split(np.array(texts, dtype=object), cuts)
            got = np.concatenate([model.encode(list(p), batch_size=batch_size) for p in parts])
        np.testing.assert_array_equal(got, whole, err_msg=f"batch_size={batch_size}, threads={threads}, cuts={cuts}")
    # token ids with right padding: the same bits as the texts' own
    ids, mask, types = model.tokenizer.batch(texts[:5], max_length=40)
    np.testing.assert_array_equal(model.encode(ids, attention_mask=mask, token_type_ids=types), whole[:5])


def test_results_do_not_depend_on_thread_count(bert, compiled_backend, monkeypatch):
    from fastattn.models import _ops

    model = fastattn.models.load(bert[0], backend=compiled_backend)
    ids, mask = _batch(np.random.default_rng(12), 3, 13, 120, True)
    serial = model(ids, attention_mask=mask).last_hidden_state  # a small batch runs on one thread
    monkeypatch.setattr(_ops, "SERIAL_BELOW", 0)  # now on every thread
    many = model(ids, attention_mask=mask).last_hidden_state
    np.testing.assert_array_equal(many, serial)
    with fastattn.set_num_threads(1):
        one = model(ids, attention_mask=mask).last_hidden_state
    np.testing.assert_array_equal(one, many)


# --------------------------------------------------------------------------------------------------------------
# Loading: clear errors
# --------------------------------------------------------------------------------------------------------------
def _copy(directory, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(directory, target)
    return target


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            del config[key]
    with open(path, "w") as f:
        json.dump(config, f)


def _drop_tensor(directory, name):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(bert, gpt2, tmp_path):
    target = _copy(bert[0], tmp_path)
    _drop_tensor(target, "encoder.layer.1.output.dense.weight")
    with pytest.raises(
        fastattn.models.CheckpointError,
        match=r"missing the tensor 'encoder\.layer\.1\.output\.dense"
        r"\.weight' \(layer 1 of num_hidden_layers=2\)",
    ):
        fastattn.models.load(target)
    target = _copy(gpt2[0], tmp_path / "g")
    _drop_tensor(target, "transformer.h.0.attn.c_attn.bias")
    with pytest.raises(fastattn.models.CheckpointError, match=r"'transformer\.h\.0\.attn\.c_attn\.bias'"):
        fastattn.models.load(target)


def test_shape_disagreeing_with_config_is_named(bert, gpt2, tmp_path):
    target = _copy(bert[0], tmp_path)
    _edit_config(target, vocab_size=121)
    with pytest.raises(
        fastattn.models.CheckpointError,
        match=r"'embeddings\.word_embeddings\.weight' has shape \(120, 48\) but config\.json implies "
        r"\(121, 48\)",
    ):
        fastattn.models.load(target)
    target = _copy(gpt2[0], tmp_path / "g")
    _edit_config(target, n_inner=100)
    with pytest.raises(fastattn.models.CheckpointError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape"):
        fastattn.models.load(target)


def test_unknown_architecture_and_bad_config(bert, tmp_path):
    target = _copy(bert[0], tmp_path)
    _edit_config(target, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(fastattn.models.CheckpointError, match=r"unsupported model_type 'mamba'.*BERT-family"):
        fastattn.models.load(target)
    _edit_config(target, model_type="bert", hidden_act="swish")
    with pytest.raises(fastattn.models.CheckpointError, match=r"hidden_act='swish' is not supported"):
        fastattn.models.load(target)
    _edit_config(target, hidden_act="gelu", num_attention_heads=5)
    with pytest.raises(fastattn.models.CheckpointError, match=r"does not split into num_attention_heads=5"):
        fastattn.models.load(target)
    _edit_config(target, num_attention_heads=4, position_embedding_type="relative_key")
    with pytest.raises(fastattn.models.CheckpointError, match=r"position_embedding_type='relative_key'"):
        fastattn.models.load(target)


def test_missing_files(bert, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model directory"):
        fastattn.models.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        fastattn.models.load(tmp_path)
    target = _copy(bert[0], tmp_path)
    os.rename(target / "model.safetensors", target / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors \(it has pytorch_model\.bin: re-save"):
        fastattn.models.load(target)


def test_bad_inputs(bert, gpt2):
    model = fastattn.models.load(bert[0], backend="numpy")
    with pytest.raises(IndexError, match=r"input_ids holds id 120, outside the vocabulary"):
        model(np.array([[1, 120]]))
    with pytest.raises(ValueError, match=r"max_position_embeddings=40: truncate"):
        model(np.ones((1, 41), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask must hold 0 \(padding\) and 1 \(token\)"):
        model(np.array([[1, 2]]), attention_mask=np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 2\)"):
        model(np.array([[1, 2]]), attention_mask=np.array([[1, 1, 1]]))
    with pytest.raises(TypeError, match=r"integer array of token ids"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        fastattn.models.load(bert[0], backend="fast")
    decoder = fastattn.models.load(gpt2[0], backend="numpy")
    with pytest.raises(ValueError, match=r"exceeds the model's n_positions=64"):
        decoder.generate(np.ones((1, 60), np.int64), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"past holds 1 sequences but input_ids has 2"):
        decoder(np.ones((2, 3), np.int64), past=decoder.new_cache(1, 8))


def test_one_dimensional_input_gives_one_sequence(bert, gpt2):
    model = fastattn.models.load(bert[0], backend="numpy")
    ids = np.array([2, 7, 9, 3])
    assert model(ids).last_hidden_state.shape == (4, 48)
    np.testing.assert_array_equal(model(ids).last_hidden_state, model(ids[None]).last_hidden_state[0])
    assert model.encode(ids).shape == (48,)
    decoder = fastattn.models.load(gpt2[0], backend="numpy")
    assert decoder(ids).logits.shape == (4, 150)
    assert decoder.generate(ids, max_new_tokens=3).sequences.shape == (7,)


def test_text_without_a_tokenizer_says_so(bert, tmp_path):
    target = _copy(bert[0], tmp_path)
    os.remove(target / "tokenizer.json")
    model = fastattn.models.load(target, backend="numpy")
    with pytest.raises(ValueError, match=r"has no tokenizer\.json: pass token ids"):
        model.encode(["some text"])


def test_missing_optional_packages_say_how_to_install(bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    model = fastattn.models.load(bert[0], backend="numpy")  # ids still work
    assert model.tokenizer is None and model.encode(np.array([[2, 7, 3]])).shape == (1, 48)
    with pytest.raises(
        ImportError, match=r'tokenizers package, which is not installed: pip install "fastattn\[models\]"'
    ):
        model.encode(["some text"])
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(
        ImportError, match=r'safetensors package, which is not installed: pip install "fastattn\[models\]"'
    ):
        fastattn.models.load(bert[0])


def test_gpt2_text_in_text_out(gpt2, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    target = _copy(gpt2[0], tmp_path)
    words = {f"w{i}": i for i in range(150)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(target / "tokenizer.json"))
    model = fastattn.models.load(target, backend="numpy")
    text = model.generate_text("w5 w17 w99", max_new_tokens=4, eos_token_id=None)
    ids = model.generate(np.array([5, 17, 99]), max_new_tokens=4, eos_token_id=None).sequences
    assert text == " ".join(f"w{i}" for i in ids[3:])
    with pytest.raises(TypeError, match=r"prompt must be a string"):
        model.generate_text([5, 17])


def test_importing_fastattn_leaves_the_optional_dependencies_alone():
    code = (
        "import sys, fastattn, fastattn.models; "
        "bad = [m for m in ('safetensors', 'tokenizers', 'torch', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_wait_policy_defaults_to_passive(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, fastattn.models; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == expected


@pytest.mark.skipif(not COMPILED, reason="no compiled backend here")
def test_models_really_use_the_backend_block_kernels(bert, monkeypatch):
    model = fastattn.models.load(bert[0], backend=COMPILED[0])
    mod = blocks(COMPILED[0])
    calls = []
    original = mod.bias_gelu
    monkeypatch.setattr(mod, "bias_gelu", lambda *a: (calls.append(1), original(*a))[1])
    model(np.array([[2, 7, 3]]))
    assert len(calls) == 2  # one per layer
