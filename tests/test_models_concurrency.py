"""Loaded models called from several Python threads at once give bitwise the results of serial calls, on every
backend: a thread's choice of thread count (tiny decode steps run on one thread) never reaches another thread's
kernels, and nothing else is shared but read-only weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import BACKENDS
from test_models import _save_bert_tokenizer, _vocab_words

import fastattn.models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert_dir = str(tmp_path_factory.mktemp("bert_mt"))
    bert = transformers.BertConfig(
        vocab_size=200,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=160,
    )
    transformers.BertModel(bert).eval().save_pretrained(bert_dir, safe_serialization=True)
    _save_bert_tokenizer(bert_dir, _vocab_words(bert.vocab_size))
    gpt2_dir = str(tmp_path_factory.mktemp("gpt2_mt"))
    gpt2 = transformers.GPT2Config(vocab_size=150, n_embd=128, n_layer=2, n_head=4, n_positions=160)
    transformers.GPT2LMHeadModel(gpt2).eval().save_pretrained(gpt2_dir, safe_serialization=True)
    return bert_dir, gpt2_dir


def _in_threads(jobs, n=4):
    """Run each of ``jobs`` (callables) in its own thread, ``n`` threads at once; their results, in order."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout=60)
            results[i] = jobs[i]()
        except Exception as exc:  # reported below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
        assert not t.is_alive(), "a thread did not finish"
    assert errors == []
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_forward_and_generate_from_four_threads_equal_serial_calls(checkpoints, backend):
    bert_dir, gpt2_dir = checkpoints
    enc = fastattn.models.load(bert_dir, backend=backend)
    dec = fastattn.models.load(gpt2_dir, backend=backend)
    rng = np.random.default_rng(0)
    words = list(_vocab_words(200))[5:]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(20, 120)))) for _ in range(32)]  # a real-size batch
    ids = rng.integers(0, 150, (8, 128))
    mask = np.ones((8, 128), np.int64)
    mask[3:, 100:] = 0  # padding: the key-bias path
    prompt = rng.integers(0, 150, (1, 12))

    jobs = {
        "encode": lambda: enc.encode(texts, batch_size=32),
        "forward": lambda: enc(ids % 200, attention_mask=mask).last_hidden_state,
        "logits": lambda: dec(ids, attention_mask=mask).logits,
        "generate": lambda: np.asarray(dec.generate(prompt, max_new_tokens=24).sequences),  # tiny decode steps
    }
    serial = {name: job() for name, job in jobs.items()}
    names = list(jobs) * 2  # each kind twice, eight calls, four at a time: big and tiny calls overlap
    got = _in_threads([jobs[name] for name in names])
    for name, result in zip(names, got, strict=True):
        assert result.dtype == serial[name].dtype
        np.testing.assert_array_equal(result, serial[name], err_msg=f"{name} on {backend}")


def test_a_local_thread_count_does_not_reach_other_threads():
    """The override a model uses for tiny steps is per thread; the process-wide count stays what it was."""
    from fastattn import _backends, _threads

    for name in [n for n in _backends.available_backends() if n != "numpy"]:
        kern = _backends.kernels(name)
        seen = {}
        before = kern.get_num_threads()
        with _threads.local_threads(1, kern):
            seen["inside"] = kern.get_num_threads()
            t = threading.Thread(target=lambda k=kern, seen=seen: seen.__setitem__("other", k.get_num_threads()))
            t.start()
            t.join()
        assert seen["inside"] == 1
        assert seen["other"] == before
        assert kern.get_num_threads() == before
