"""fastattn.models.dask and ``embed --input``: a corpus embedded on Dask, nothing lost, the same bits everywhere.

A small random BERT (test_models' ``bert`` fixture, built with transformers and saved locally) embeds a few hundred
texts on a ``LocalCluster`` of 2 worker processes with 1 thread each, started and closed here, on local addresses.

What "the same bits" means (fastattn.models.dask's docstring): the result is, bit for bit, the in-process
``load(model).encode(all_texts)`` of the whole corpus in one call (``reference`` below), whatever the partitioning,
the batch size, the scheduler, the workers, their threads and their deaths, on both compiled backends.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import sys
import time

import cloudpickle
import dask
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import test_models
import threadpoolctl
from conftest import COMPILED
from distributed import Client, LocalCluster

import fastattn
import fastattn.models
import fastattn.models.dask as fdask
from fastattn.__main__ import main

# the checkpoints of the models tests (module-scoped fixtures: built once here, with transformers, saved locally)
hf, bert, gpt2 = test_models.hf, test_models.bert, test_models.gpt2

TIMEOUT = 120.0  # seconds for any one compute on the cluster: a hang fails the test instead of the suite
WORDS = [w for w in test_models._vocab_words(120) if w.isalpha()]


def make_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(n)]


TEXTS = make_texts(300)


@pytest.fixture(scope="module", autouse=True)
def _blas_threads_back():
    """Tasks run here (the sync and threads schedulers) leave this process's BLAS on one thread (fastattn.models.dask's
    docstring); the test modules after this one get it back."""
    original = threadpoolctl.threadpool_limits(limits=None, user_api="blas")
    yield
    original.restore_original_limits()


@pytest.fixture(scope="module")
def client():
    """2 worker processes of 1 thread, local addresses only, no dashboard; closed at the end of the module."""
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    with cluster, Client(cluster) as c:
        yield c


def reference(directory, partitions, *, normalize=True, backend=None):
    """What a Dask result must equal bit for bit (issue #16): the in-process ``load(model).encode(all_texts)`` of the
    whole corpus in one call, on this process's threads and the default batch size, whatever the partitioning."""
    model = fastattn.models.load(directory, backend=backend)
    texts = [t for p in partitions for t in p]
    if not texts:
        return np.empty((0, model.config.hidden_size), np.float32)
    return model.encode(texts, normalize=normalize)


def bag_of(partitions):
    return db.from_delayed([dask.delayed(list)(list(p)) for p in partitions])


def split(texts, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(texts[start : start + n])
        start += n
    assert start == len(texts)
    return out


def compute(client, array):
    return client.compute(array).result(timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------------------------
# Results: input order, chunks, bits
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", COMPILED)
def test_cluster_result_is_the_in_process_encode_whatever_the_partitioning(bert, client, backend):
    directory = bert[0]
    for sizes in ([300], [100, 100, 100], [1, 57, 0, 142, 37, 63]):
        partitions = split(TEXTS, sizes)
        emb = fdask.encode(bag_of(partitions), directory, batch_size=16, backend=backend)
        assert emb.dtype == np.float32 and emb.shape == (300, 48)
        assert emb.chunks == (tuple(sizes), (48,))
        got = compute(client, emb)
        np.testing.assert_array_equal(got, reference(directory, partitions, backend=backend))


def test_series_input_keeps_the_row_order(bert, client):
    directory = bert[0]
    frame = pd.DataFrame({"text": TEXTS[:120]}, index=np.arange(1000, 880, -1))  # a descending, offset index
    series = dd.from_pandas(frame, npartitions=4, sort=False)["text"]
    partitions = [p.tolist() for p in dask.compute(*series.to_delayed(), scheduler="sync")]
    assert len(partitions) == 4 and sum(partitions, []) == TEXTS[:120]
    emb = fdask.encode(series, directory, batch_size=8, normalize=False)
    assert emb.chunks[0] == tuple(len(p) for p in partitions)
    np.testing.assert_array_equal(compute(client, emb), reference(directory, partitions, normalize=False))


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_local_schedulers_give_the_same_bits(bert, scheduler):
    directory = bert[0]
    partitions = split(TEXTS[:90], [40, 25, 25])
    emb = fdask.encode(bag_of(partitions), directory, batch_size=16)
    with dask.config.set(scheduler=scheduler, num_workers=1 if scheduler == "processes" else 2):
        got = emb.compute()
    np.testing.assert_array_equal(got, reference(directory, partitions))


def test_each_task_runs_on_one_thread_and_fastattn_gets_its_threads_back(bert, monkeypatch):
    directory = bert[0]
    seen = []
    original = fastattn.models.BertModel.encode

    def spy(self, *args, **kwargs):
        blas = [m["num_threads"] for m in threadpoolctl.threadpool_info() if m["user_api"] == "blas"]
        seen.append((fastattn.get_num_threads(), max(blas)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fastattn.models.BertModel, "encode", spy)
    before = fastattn.get_num_threads()
    emb = fdask.encode(bag_of(split(TEXTS[:80], [20] * 4)), directory)
    with dask.config.set(scheduler="threads", num_workers=2):  # tasks side by side in this process
        emb.compute()
    assert seen == [(1, 1)] * 4
    assert fastattn.get_num_threads() == before  # BLAS stays on one thread in a process that ran tasks (docstring)
    assert {m["num_threads"] for m in threadpoolctl.threadpool_info() if m["user_api"] == "blas"} == {1}


def test_tasks_side_by_side_truncate_long_texts_on_their_own_tokenizers(bert):
    """Texts longer than the model's 40 positions are truncated by the tokenizer, which switches truncation on and off
    around each call: each thread has its own, or one thread's switch-off reaches the other's long texts (with one
    shared tokenizer this test fails: "sequences of 80 tokens need position 79 ... truncate the input")."""
    directory = bert[0]
    long_texts = make_texts(160, seed=3)
    long_texts = [t + " " + t + " " + t for t in long_texts]  # 3 to 87 words: most beyond 40 positions
    partitions = split(long_texts, [10] * 16)
    emb = fdask.encode(bag_of(partitions), directory, batch_size=4)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: a shared tokenizer fails this test
    try:
        with dask.config.set(scheduler="threads", num_workers=4):
            got = emb.compute()
    finally:
        sys.setswitchinterval(interval)
    np.testing.assert_array_equal(got, reference(directory, partitions))


def test_model_is_loaded_once_per_worker_and_never_shipped(bert, client):
    directory = bert[0]
    emb = fdask.encode(db.from_sequence(TEXTS, npartitions=12), directory, batch_size=32)
    compute(client, emb)
    loads = [info.get(f"{directory}|None|float32", 0) for info in client.run(fdask._cache_info).values()]
    assert max(loads) == 1 and sum(loads) >= 1, loads  # at most once per worker process, whatever the tasks
    graph = len(cloudpickle.dumps(dict(emb.__dask_graph__())))
    weights = os.path.getsize(os.path.join(directory, "model.safetensors"))
    assert graph < weights / 4, (graph, weights)  # the texts and the path travel, not the weights


# --------------------------------------------------------------------------------------------------------------
# Reliability: a worker killed mid-job
# --------------------------------------------------------------------------------------------------------------
def _slow(partition):
    time.sleep(0.2)  # long enough for the kill to land while tasks run
    return partition


def test_a_killed_worker_loses_and_duplicates_nothing(bert, client):
    directory = bert[0]
    partitions = split(TEXTS, [25] * 12)
    emb = fdask.encode(bag_of(partitions).map_partitions(_slow), directory, batch_size=8)
    want = reference(directory, partitions)
    pids = client.run(os.getpid)
    future = client.compute(emb)
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:  # wait until a worker runs an embedding task
        for address, keys in client.processing().items():
            if any(fdask.TASK_PREFIX in str(k) for k in keys):
                victim = address
                break
        time.sleep(0.02)
    assert victim is not None, "no embedding task ran"
    assert not future.done()
    os.kill(pids[victim], signal.SIGKILL)
    got = future.result(timeout=TIMEOUT)
    np.testing.assert_array_equal(got, want)  # every row once, in order, with the bits of one process
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()  # the kill happened; the Nanny started a new worker


# --------------------------------------------------------------------------------------------------------------
# Bad input, empty input
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, 3.5, 7, b"bytes"])
def test_an_item_that_is_not_a_string_is_named_by_its_position(bert, client, bad):
    texts = list(TEXTS[:100])
    texts[57] = bad
    bag = bag_of(split(texts, [30, 20, 50]))  # item 7 of partition 2
    with pytest.raises(TypeError, match=r"texts\[57\] \(item 7 of partition 2\) is " + type(bad).__name__):
        fdask.encode(bag, bert[0])


def test_a_missing_value_in_a_series_is_named_by_position_and_label(bert, client):
    frame = pd.DataFrame({"text": TEXTS[:40]}, index=np.arange(100, 140))
    frame.loc[125, "text"] = None
    series = dd.from_pandas(frame, npartitions=2, sort=False)["text"]
    with pytest.raises(TypeError, match=r"texts\[25\] \(item 5 of partition 1, index label 125\)"):
        fdask.encode(series, bert[0])


def test_empty_partitions_and_an_empty_corpus(bert, client):
    directory = bert[0]
    partitions = split(TEXTS[:50], [0, 20, 0, 0, 30, 0])
    emb = fdask.encode(bag_of(partitions), directory)
    assert emb.chunks[0] == (0, 20, 0, 0, 30, 0)
    np.testing.assert_array_equal(compute(client, emb), reference(directory, partitions))
    for empty in (db.from_sequence([], npartitions=1), bag_of([[], [], []])):
        emb = fdask.encode(empty, directory)
        assert emb.shape == (0, 48)
        got = compute(client, emb)
        assert got.shape == (0, 48) and got.dtype == np.float32


def test_a_model_path_a_worker_cannot_load_is_named_not_a_hang(bert, gpt2, client, tmp_path):
    bag = db.from_sequence(TEXTS[:10], npartitions=2)
    missing = str(tmp_path / "no-such-model")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(fdask.encode, bag, missing)
        with pytest.raises(FileNotFoundError, match=r"worker tcp://127\.0\.0\.1:\d+ cannot load the model .*no-such"):
            call.result(timeout=TIMEOUT)
    with pytest.raises(ValueError, match="holds a GPT2Model; encode needs an encoder"):
        fdask.encode(bag, gpt2[0])
    no_tokenizer = shutil.copytree(bert[0], tmp_path / "bert")
    os.remove(no_tokenizer / "tokenizer.json")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        fdask.encode(bag, str(no_tokenizer))


def test_bad_arguments_are_named(bert):
    bag = db.from_sequence(TEXTS[:4], npartitions=1)
    with pytest.raises(TypeError, match="texts must be a dask.bag.Bag or a dask.dataframe.Series.*got list"):
        fdask.encode(TEXTS, bert[0])
    frame = dd.from_pandas(pd.DataFrame({"text": TEXTS[:4]}), npartitions=1)
    with pytest.raises(TypeError, match="got a DataFrame: pick its column"):
        fdask.encode(frame, bert[0])
    model = fastattn.models.load(bert[0])
    with pytest.raises(TypeError, match="model must be the path of a checkpoint directory.*got BertModel"):
        fdask.encode(bag, model)
    with pytest.raises(ValueError, match="batch_size"):
        fdask.encode(bag, bert[0], batch_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fdask.encode(bag, bert[0], backend="cuda")


# --------------------------------------------------------------------------------------------------------------
# The embed command on a corpus
# --------------------------------------------------------------------------------------------------------------
def test_embed_command_in_process_reads_text_jsonl_and_parquet(bert, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = bert[0]
    texts = TEXTS[:40] + [""]  # a blank line is an item too: row i is line i + 1
    want = fastattn.models.load(directory).encode(texts, batch_size=8)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "body": t}) + "\n")
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "in.parquet")
    for name, extra in (("in.txt", []), ("in.jsonl", ["--field", "body"]), ("in.parquet", ["--column", "body"])):
        out = str(tmp_path / f"{name}.npy")
        args = ["embed", "--model", directory, "--input", str(tmp_path / name), "--output", out, "--batch-size", "8"]
        assert main(args + extra) == 0, capsys.readouterr().err
        np.testing.assert_array_equal(np.load(out), want)
    out = str(tmp_path / "out.parquet")
    assert (
        main(["embed", "--model", directory, "--input", str(tmp_path / "in.txt"), "--output", out, "--batch-size", "8"])
        == 0
    )
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(len(texts)))
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), want)


def test_embed_command_bad_corpus_files(bert, tmp_path, capsys):
    directory = bert[0]
    (tmp_path / "in.jsonl").write_text('{"body": "a dog"}\n{"body": 3}\n')
    (tmp_path / "good.jsonl").write_text('{"body": "a dog"}\n')
    (tmp_path / "in.parquet").write_bytes(b"")
    cases = [
        (["--input", str(tmp_path / "in.jsonl"), "--field", "body"], "in.jsonl, line 2: field 'body' is int"),
        (["--input", str(tmp_path / "in.jsonl"), "--field", "text"], "line 1: no field 'text'"),
        (["--input", str(tmp_path / "in.jsonl")], "is JSONL: name the field of texts with --field"),
        (["--input", str(tmp_path / "in.parquet")], "is Parquet: name the column of texts with --column"),
        (["--input", str(tmp_path / "nope.txt")], "no input file"),
        (["--input", str(tmp_path / "good.jsonl"), "--field", "body", "--output", "x.csv"], "must end in .npy or"),
        (["--workers", "0", "a dog"], "--workers must be at least 1"),
    ]
    for extra, message in cases:
        assert main(["embed", "--model", directory, *extra]) == 1
        assert message in capsys.readouterr().err


def test_embed_command_on_a_cluster_writes_rows_in_input_order(bert, client, tmp_path, capsys):
    directory = bert[0]
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    want = reference(directory, split(TEXTS, [64] * 4 + [44]))
    base = ["embed", "--model", directory, "--input", str(tmp_path / "in.txt"), "--batch-size", "8"]
    base += ["--partition-size", "64", "--scheduler", client.scheduler.address]
    assert main([*base, "--output", str(tmp_path / "out.npy")]) == 0
    assert "Completed" in capsys.readouterr().err  # Dask's progress bar, on stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    import pyarrow.parquet as pq

    assert main([*base, "--output", str(tmp_path / "out.parquet")]) == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == list(range(len(TEXTS)))
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), want)


def test_embed_command_starts_its_own_local_cluster(bert, tmp_path, capsys):
    directory = bert[0]
    out = str(tmp_path / "out.npy")
    args = ["embed", "--model", directory, "--workers", "1", "--backend", "cython", "--partition-size", "2"]
    args += ["--output", out]
    assert main([*args, *TEXTS[:5]]) == 0
    err = capsys.readouterr().err
    assert "Dask dashboard: http://" in err and "wrote 5 embeddings of width 48" in err
    want = reference(directory, split(TEXTS[:5], [2, 2, 1]), backend="cython")
    np.testing.assert_array_equal(np.load(out), want)
