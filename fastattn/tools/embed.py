"""``python -m fastattn embed --model DIR "some text"``: sentence embeddings from a local encoder directory.

Prints one embedding per input line: the numbers separated by spaces (``--format json``: a JSON list per line).
Text needs the directory's ``tokenizer.json`` and the tokenizers package; ``--ids`` takes token ids instead.
With no text on the command line, each line of standard input is one text.

A corpus: ``--input FILE`` (text, one item a line; JSONL with ``--field``; Parquet with ``--column``) and
``--output OUT.npy`` (rows in input order; ``OUT.parquet``: an ``id`` column, the item's position, and an
``embedding`` column). It runs in this process, or on Dask with ``--workers N`` (a local cluster of N processes of
one thread) or ``--scheduler ADDRESS`` (a running cluster): see ``fastattn.models.dask``. The corpus is read here
and sent to the workers in partitions of ``--partition-size`` items; the output's bits depend on that size and
``--batch-size``, not on the workers.
"""

from __future__ import annotations

import json
import sys

HELP = "print sentence embeddings of text from a local BERT-family model directory (fastattn.models)"


def add_arguments(parser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: lines of stdin)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="Hugging Face model directory: config.json, model.safetensors, tokenizer.json",
    )
    parser.add_argument("--backend", default=None, help="numba, cython or numpy (default: automatic)")
    parser.add_argument(
        "--ids", action="store_true", help="each TEXT is token ids separated by spaces or commas, not text"
    )
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls", "max", "mean_sqrt_len"),
        default=None,
        help="default: the directory's sentence-transformers pooling, else mean",
    )
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the embeddings")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--decimals", type=int, default=6, help="digits after the point (text format)")
    parser.add_argument("--batch-size", type=int, default=32)
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument(
        "--input", metavar="FILE", help="texts to embed: one a line, JSONL (--field) or Parquet (--column)"
    )
    corpus.add_argument("--field", help="the JSON field of each JSONL line that holds the text")
    corpus.add_argument("--column", help="the Parquet column that holds the texts")
    corpus.add_argument("--output", metavar="OUT", help="write the embeddings to OUT.npy (input order) or OUT.parquet")
    where = corpus.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run on the Dask cluster at ADDRESS (tcp://host:8786)")
    where.add_argument("--workers", type=int, metavar="N", help="run on a local Dask cluster of N one-thread processes")
    corpus.add_argument(
        "--partition-size", type=int, default=1024, metavar="K", help="items per Dask task (default 1024)"
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids expects integers separated by spaces or commas, got {text!r}") from None


def run(args) -> int:
    import numpy as np

    from ..models import BertModel, CheckpointError, load

    if args.input is not None or args.output is not None or args.scheduler is not None or args.workers is not None:
        try:
            return embed_corpus(args)
        except (OSError, ImportError, ValueError, IndexError, TypeError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        print("error: no text to embed (give TEXT arguments or lines on stdin)", file=sys.stderr)
        return 2
    try:
        model = load(args.model, backend=args.backend)
        if not isinstance(model, BertModel):
            raise ValueError(f"{args.model} holds a {type(model).__name__}; embed needs an encoder (BERT family)")
        normalize = False if args.no_normalize else None
        if args.ids:
            rows = [_parse_ids(t) for t in texts]
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            emb = model.encode(ids, attention_mask=mask, pooling=args.pooling, normalize=normalize)
        else:
            emb = model.encode(texts, pooling=args.pooling, normalize=normalize, batch_size=args.batch_size)
    except (OSError, ImportError, ValueError, IndexError, TypeError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_rows(np.atleast_2d(emb), args)
    return 0


def _print_rows(emb, args) -> None:
    for row in emb:
        if args.format == "json":
            print(json.dumps([round(float(x), args.decimals) for x in row]))
        else:
            print(" ".join(f"{float(x):.{args.decimals}f}" for x in row))


# ----------------------------------------------------------------------------------------------------------------
# A corpus: --input / --output, in this process or on Dask
# ----------------------------------------------------------------------------------------------------------------
def embed_corpus(args) -> int:
    """Read the corpus, embed it (here, or on Dask with --workers / --scheduler), write or print the embeddings."""
    import numpy as np

    on_dask = args.scheduler is not None or args.workers is not None
    if args.input is not None and args.texts:
        raise ValueError("give either TEXT arguments or --input FILE, not both")
    if args.ids:
        raise ValueError("--ids embeds TEXT arguments in this process: drop --input/--output/--scheduler/--workers")
    if args.pooling is not None and on_dask:
        raise ValueError("--pooling runs in this process (on Dask the directory's pooling is used)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.partition_size < 1:
        raise ValueError(f"--partition-size must be at least 1, got {args.partition_size}")
    if args.input is not None:
        texts = read_corpus(args.input, field=args.field, column=args.column)
    else:
        if args.field is not None or args.column is not None:
            raise ValueError("--field and --column go with --input")
        texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.output is not None and not args.output.lower().endswith((".npy", ".parquet", ".pq")):
        raise ValueError(f"--output must end in .npy or .parquet, got {args.output!r}")
    normalize = False if args.no_normalize else None
    if on_dask:
        out, shape = _embed_on_dask(texts, args, normalize)
    else:
        from ..models import BertModel, load

        model = load(args.model, backend=args.backend)
        if not isinstance(model, BertModel):
            raise ValueError(f"{args.model} holds a {type(model).__name__}; embed needs an encoder (BERT family)")
        out = model.encode(texts, pooling=args.pooling, normalize=normalize, batch_size=args.batch_size)
        out = np.asarray(out, np.float32).reshape(len(texts), -1)
        shape = out.shape
        if args.output is not None:
            write_embeddings(args.output, out)
    if args.output is None:
        _print_rows(out, args)
    else:
        print(f"wrote {shape[0]} embeddings of width {shape[1]} to {args.output}", file=sys.stderr)
    return 0


def read_corpus(path: str, *, field: str | None = None, column: str | None = None) -> list[str]:
    """The texts of ``path``: Parquet (``column``), JSONL (``field`` of each line's object), else one text a line
    (every line, blank ones too, so that item i is line i + 1)."""
    import os

    lower = path.lower()
    if field is not None and column is not None:
        raise ValueError("--field (JSONL) and --column (Parquet) exclude each other")
    if column is not None or lower.endswith((".parquet", ".pq")):
        if column is None:
            raise ValueError(f"{path} is Parquet: name the column of texts with --column")
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if column not in schema.names:
            raise ValueError(f"{path} has no column {column!r}; its columns: {schema.names}")
        texts = pq.read_table(path, columns=[column]).column(column).to_pylist()
        _check_strings(texts, lambda i: f"{path}: row {i} of column {column!r}")
        return texts
    if field is not None or lower.endswith((".jsonl", ".ndjson")):
        if field is None:
            raise ValueError(f"{path} is JSONL: name the field of texts with --field")
        texts = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}, line {number}: no field {field!r}")
                texts.append(record[field])
                if not isinstance(texts[-1], str):
                    raise TypeError(
                        f"{path}, line {number}: field {field!r} is {type(texts[-1]).__name__}, expected a string"
                    )
        return texts
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no input file {path!r}")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _check_strings(texts, where) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{where(i)} is {type(text).__name__}, expected a string")


def write_embeddings(path: str, emb) -> None:
    """Write ``emb`` (n, D) to ``path``: ``.parquet`` (columns ``id`` = input position, ``embedding``), else
    ``.npy``. The Dask path streams its blocks through ``open_output`` / ``write_block`` / ``close_output``."""
    out = open_output(path, emb.shape[0], emb.shape[1])
    write_block(out, 0, emb)
    close_output(out)


def open_output(path: str, n: int, width: int):
    """An output file for ``n`` rows of ``width`` float32, written block by block in input order."""
    import numpy as np

    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), width))])
        return ("parquet", pq.ParquetWriter(path, schema), width)
    return ("npy", np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, width)), width)


def write_block(out, start: int, block) -> None:
    import numpy as np

    kind, target, width = out
    block = np.ascontiguousarray(block, np.float32).reshape(-1, width)
    if kind == "npy":
        target[start : start + block.shape[0]] = block
        return
    import pyarrow as pa

    ids = pa.array(np.arange(start, start + block.shape[0], dtype=np.int64))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), width)
    target.write_table(pa.Table.from_arrays([ids, emb], names=["id", "embedding"]))


def close_output(out) -> None:
    kind, target, _ = out
    if kind == "npy":
        target.flush()
        del target
    else:
        target.close()


def _embed_on_dask(texts: list[str], args, normalize):
    """Embed on a local cluster (--workers) or a running one (--scheduler), showing Dask's progress bar and the
    dashboard's address on stderr. Returns (embeddings, shape), or (None, shape) once they are written block by
    block to --output."""
    import contextlib
    import os

    import dask.bag as db
    import numpy as np
    from distributed import Client, LocalCluster, progress

    from ..models import dask as fdask

    with contextlib.ExitStack() as stack:
        if args.workers is not None:
            cluster = stack.enter_context(
                LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
            )
            client = stack.enter_context(Client(cluster))
            model = os.path.abspath(args.model)  # the local workers may start elsewhere
        else:
            client = stack.enter_context(Client(args.scheduler))
            model = args.model  # as it is spelled on the workers
        if client.dashboard_link:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        bag = db.from_sequence(texts, partition_size=args.partition_size, npartitions=None if texts else 1)
        emb = fdask.encode(bag, model, batch_size=args.batch_size, normalize=normalize, backend=args.backend)
        blocks = client.compute(emb.to_delayed().ravel().tolist())
        with contextlib.redirect_stdout(sys.stderr):
            progress(blocks, multi=False)
            print(file=sys.stderr)
        if args.output is None:
            return np.concatenate([np.empty((0, emb.shape[1]), np.float32)] + [b.result() for b in blocks]), emb.shape
        out = open_output(args.output, emb.shape[0], emb.shape[1])
        try:
            start = 0
            for block in blocks:
                values = block.result()
                write_block(out, start, values)
                start += values.shape[0]
                block.release()
        finally:
            close_output(out)
        return None, emb.shape
