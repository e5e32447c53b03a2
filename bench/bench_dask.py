"""A corpus through all-MiniLM-L6-v2's shape: one process, Dask's threaded scheduler, a 2-worker LocalCluster.

The model is random (6 layers, 384 wide, 12 heads, FFN 1536, vocabulary 30522: ``bench_models.build_encoder``),
saved into a temporary folder with a WordPiece tokenizer over a made-up vocabulary; the texts are random sentences
of 4 to 40 words (about 6 to 42 tokens). Three ways to embed the same corpus, each timed once after a warm-up:

- ``in-process``: ``load(model).encode(texts, batch_size=B)`` with ``--threads`` threads (fastattn and NumPy's BLAS);
- ``dask threads``: ``fastattn.models.dask.encode`` on Dask's threaded scheduler, ``--threads`` tasks at a time in
  this process, one thread each;
- ``cluster``: the same on a ``LocalCluster`` of ``--threads`` worker processes of one thread (the model loaded
  and the kernels warmed on each worker first; the cluster's start-up is reported apart).

The cluster path's overhead is its time against the in-process time. ``encode`` itself (counting and checking the
texts, the model's width from a worker) is included in the Dask timings and also reported alone.

Run it (under the shared benchmark lock)::

    flock /tmp/fastattn-bench.lock python bench/bench_dask.py --texts 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

WORDS = (
    "the a an dog cat bird fish horse chased ran jumped over under through into garden house tree car road city "
    "river mountain sky sun moon star rain snow wind quick slow lazy brown black white red blue green small big old "
    "new young happy sad loud quiet bright dark warm cold is was were are be been has have had will would can could "
    "and or but not very too also only just still then when where why how who what which this that these those "
    "people child children man woman friend family teacher student doctor music book story film game team school "
    "work home night morning evening day week year time place world country market street park beach forest"
).split()


def build(directory: str) -> None:
    """The random MiniLM-shaped encoder and its WordPiece tokenizer."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_models import build_encoder
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    build_encoder(directory, "full")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(os.path.join(directory, "tokenizer.json"))


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 41))) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2, help="threads in process = tasks at once = workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--partition-size", type=int, default=500)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)

    import dask
    import dask.bag as db
    import threadpoolctl
    from distributed import Client, LocalCluster

    import fastattn
    import fastattn.models
    import fastattn.models.dask as fdask

    texts = corpus(args.texts)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        build(directory)
        model = fastattn.models.load(directory, backend=args.backend)
        bag = db.from_sequence(texts, partition_size=args.partition_size)
        n_parts = bag.npartitions
        print(
            f"{args.texts} texts (mean {np.mean([len(t.split()) for t in texts]):.1f} words), {n_parts} partitions "
            f"of {args.partition_size}, batch {args.batch_size}, backend {args.backend or 'automatic'}, "
            f"{args.threads} threads, {os.cpu_count()} cores",
            flush=True,
        )

        # 1. in process, all threads (run first: a process that ran Dask tasks keeps BLAS on one thread)
        with threadpoolctl.threadpool_limits(args.threads, user_api="blas"), fastattn.set_num_threads(args.threads):
            model.encode(texts[:256], batch_size=args.batch_size)  # warm-up
            start = time.perf_counter()
            want = model.encode(texts, batch_size=args.batch_size)
            rows.append(("in-process", time.perf_counter() - start))

        # 2. Dask's threaded scheduler in this process
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            fdask.encode(db.from_sequence(texts[:256], npartitions=args.threads), directory).compute()  # warm-up
            start = time.perf_counter()
            emb = fdask.encode(bag, directory, batch_size=args.batch_size, backend=args.backend)
            graph_ready = time.perf_counter() - start
            got = emb.compute()
            rows.append(("dask threads", time.perf_counter() - start))
        err = float(np.abs(got - want).max())

        # 3. a LocalCluster of one-thread worker processes
        start = time.perf_counter()
        with (
            LocalCluster(
                n_workers=args.threads, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            startup = time.perf_counter() - start
            warm = db.from_sequence(texts[: 64 * args.threads], npartitions=2 * args.threads)
            fdask.encode(warm, directory, backend=args.backend).compute()  # every worker loads the model
            loads = client.run(fdask._cache_info)
            start = time.perf_counter()
            emb = fdask.encode(bag, directory, batch_size=args.batch_size, backend=args.backend)
            cluster_ready = time.perf_counter() - start
            got_cluster = emb.compute()
            rows.append(("cluster", time.perf_counter() - start))
        same = bool(np.array_equal(got, got_cluster))

    base = rows[0][1]
    print(f"\n{'path':<14}{'seconds':>10}{'texts/s':>10}{'vs in-process':>16}")
    for name, seconds in rows:
        print(f"{name:<14}{seconds:>10.2f}{args.texts / seconds:>10.0f}{seconds / base:>15.2f}x")
    print(
        f"\nencode() before any embedding (count + check the texts, model width): threads {graph_ready:.2f} s, "
        f"cluster {cluster_ready:.2f} s; cluster start-up {startup:.1f} s (not in the table); model loads per "
        f"worker: {sorted(sum(v.values()) for v in loads.values())}"
    )
    print(f"dask threads vs cluster bitwise equal: {same}; max |dask - in-process| = {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
