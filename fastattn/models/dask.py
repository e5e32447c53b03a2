"""Embed a corpus on Dask: ``encode(texts, model)`` turns a Bag or Series of strings into a Dask array.

Install with ``pip install "fastattn[dask]"`` (dask's array, bag and dataframe parts, distributed, threadpoolctl).
Works with every Dask scheduler: the local ones (synchronous, threads, processes) and any ``distributed.Client``
(a ``LocalCluster``, or the address of a cluster deployed over SSH, on Kubernetes, on a job queue, ...).

What travels and what stays
    Only the checkpoint's path goes into the task graph, never its weights. Each worker process loads the model the
    first time one of its tasks needs it and keeps it for every later task (a module-level cache keyed by path,
    backend and dtype); a worker that dies and is restarted loads it again. The path must exist on every worker.

The unit of work is a partition
    One task per input partition embeds that partition's texts and yields one chunk of the result, in input order.
    Larger partitions amortise the per-task overhead (scheduling, the transfer of texts and embeddings); smaller ones
    balance the load better and lose less work when a worker dies. A few hundred to a few thousand texts a partition
    suits a sentence encoder.

Threads
    Every task runs on one thread: fastattn's kernels (``fastattn.set_num_threads(1)``) and the BLAS and OpenMP
    libraries (threadpoolctl) alike, and a worker with ``nthreads`` threads embeds ``nthreads`` partitions at once
    (the processes scheduler: one partition per process). So the workers of a machine use its cores without
    oversubscribing them.

Reproducibility: the result is, bit for bit, the in-process call on the whole corpus::

    fastattn.models.load(model, backend=backend).encode(all_texts, normalize=normalize)

    whatever the partitioning, the batch size, the scheduler, the number of workers and their threads, and a worker
    dying mid-job (its partitions are recomputed, none lost or duplicated). That holds because ``encode`` gives a
    text the same bits in any batch (``BertModel.encode``): its matmuls run on the backend's own micro-kernel
    (``text_matmul``), which computes a row the same way wherever it sits (OpenBLAS does not: a row's bits depend
    on its place in the matrix and on the thread split), on the real tokens of each text only, and the attention
    and block kernels compute a row the same way whatever the padded length and the thread count. Conditions: one
    of the compiled backends (the NumPy oracle's sums depend on the padded length) with its default tile products
    (``FASTATTN_TILES=micro``; the ``blas`` and ``loops`` products are not padding-invariant), the same attention
    plan (``fastattn.plan_info()``: the built-in plans are the same for every thread count, but a plan tuned by
    ``python -m fastattn tune`` is per thread count, and another key tile regroups a long text's softmax sums),
    and the same machine code: the same fastattn and NumPy builds and an instruction set the workers share (a
    worker on another CPU may pick another ISA build).

Errors are raised on the client by ``encode`` itself, before any embedding: an item that is not a string (named
by its position in the corpus), a model path that cannot be loaded on a worker (named, with the worker), a model
that is not an encoder with a tokenizer. ``encode`` therefore computes the input once to count and check it (the
length of each partition gives the array its chunks) and once more to embed it; ``persist()`` an input that is
expensive to produce.

Examples
--------
>>> import dask.bag as db
>>> from distributed import Client, LocalCluster                                        # doctest: +SKIP
>>> import fastattn.models.dask as fdask
>>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))                     # doctest: +SKIP
>>> texts = db.from_sequence(["The dog chased the cat.", "A cat was chased."] * 500, partition_size=250)
>>> emb = fdask.encode(texts, "path/to/all-MiniLM-L6-v2")                                # doctest: +SKIP
>>> emb.shape, emb.chunks[0]                                                             # doctest: +SKIP
((1000, 384), (250, 250, 250, 250))
>>> emb.compute()[0] @ emb.compute()[1]            # cosine similarity                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    import dask.bag as db
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:  # pragma: no cover - the [dask] extra is in the test extra
    raise ImportError(f'fastattn.models.dask needs Dask ({exc}): pip install "fastattn[dask]"') from exc

from .. import _backends
from .. import _validation as V

__all__ = ["encode"]

#: the precision of the weights and of the result.
DTYPE = np.dtype(np.float32)
#: the prefix of the embedding tasks' keys (what the dashboard and the progress bar show).
TASK_PREFIX = "fastattn-encode"


def encode(texts, model, *, batch_size: int = 64, normalize: bool | None = True, backend: str | None = None):
    """Sentence embeddings of a Dask collection of strings, computed where its partitions are.

    Parameters
    ----------
    texts : dask.bag.Bag or dask.dataframe.Series of str
        The corpus; its partitions are the unit of work.
    model : str or os.PathLike
        A checkpoint directory (``fastattn.models.load`` reads it) that exists on every worker: config.json,
        model.safetensors, tokenizer.json of a BERT-family encoder. Only the path travels to the workers.
    batch_size : int
        Texts per forward pass inside a partition (``BertModel.encode``: sorted by length, then batched).
    normalize : bool or None
        L2-normalise the embeddings (default); None follows the directory's sentence-transformers modules.
    backend : str, optional
        ``"numba"``, ``"cython"`` or ``"numpy"`` on the workers; None: each worker's automatic choice.

    Returns
    -------
    dask.array.Array, shape (n, D), float32
        One chunk per input partition, rows in input order. Nothing is embedded until it is computed.

    Raises
    ------
    TypeError
        ``texts`` is not a Bag or Series, an item is not a string (the message gives its position), ``model`` is
        not a path.
    FileNotFoundError, CheckpointError, ValueError
        The model cannot be loaded on a worker (the message names the path and the worker), is not an encoder,
        or has no tokenizer.json.

    Examples
    --------
    >>> import dask.bag as db, fastattn.models.dask as fdask
    >>> texts = db.from_sequence(["a dog", "a cat", "red sky"], npartitions=2)
    >>> fdask.encode(texts, "path/to/model").compute().shape                              # doctest: +SKIP
    (3, 384)
    """
    if isinstance(model, os.PathLike) or isinstance(model, str):
        path = os.fspath(model)
    else:
        raise TypeError(
            "model must be the path of a checkpoint directory (str or os.PathLike), so that only the path travels to "
            f"the workers (each loads the model once), got {type(model).__name__}"
        )
    batch_size = V.positive_int("batch_size", batch_size)
    if normalize is not None:
        normalize = V.flag("normalize", normalize)
    if backend is not None and backend not in _backends.NAMES:
        raise ValueError(f"backend must be one of {_backends.NAMES} or None, got {backend!r}")
    parts = _partitions(texts)

    # Pass 1 (on the cluster, results on the client): each partition's length and first bad item; the model's width,
    # which also loads it on one worker and fails now, naming the path, if it cannot be loaded there.
    counted = [dask.delayed(_inspect, pure=True)(part) for part in parts]
    info = dask.delayed(_model_info, pure=True)(path, backend)
    *counts, width = dask.compute(*counted, info)
    offsets = np.concatenate([[0], np.cumsum([n for n, _ in counts], dtype=np.int64)])
    for p, (_, bad) in enumerate(counts):
        if bad is not None:
            raise TypeError(_bad_item_message(int(offsets[p]) + bad[0], p, *bad))

    # Pass 2 (lazy): one task per partition, block p of the array (keys (name, p, 0), as the dashboard shows them).
    name = f"{TASK_PREFIX}-{dask.base.tokenize(parts, path, backend, batch_size, normalize)}"
    encode_task = dask.delayed(_encode_partition, pure=True)
    tasks = [
        encode_task(
            part, path, backend, batch_size, normalize, p, int(offsets[p]), n, width, dask_key_name=(name, p, 0)
        )
        for p, (part, (n, _)) in enumerate(zip(parts, counts, strict=True))
    ]
    if not tasks:
        return da.empty((0, width), dtype=DTYPE, chunks=((0,), (width,)))
    graph = HighLevelGraph.merge(*(t.__dask_graph__() for t in tasks))
    rows = tuple(n for n, _ in counts)
    return da.Array(graph, name, chunks=(rows, (width,)), meta=np.empty((0, 0), DTYPE))


# ----------------------------------------------------------------------------------------------------------------
# The client side: partitions and messages
# ----------------------------------------------------------------------------------------------------------------
def _partitions(texts) -> list:
    """One Delayed per partition of a Bag or a Series, in order."""
    import dask.dataframe as dd

    if isinstance(texts, db.Bag):
        return list(texts.to_delayed())
    if isinstance(texts, dd.Series):
        return list(texts.to_delayed())
    if isinstance(texts, dd.DataFrame):
        raise TypeError(
            "texts must be a dask.dataframe.Series of strings, got a DataFrame: pick its column, df['text']"
        )
    raise TypeError(f"texts must be a dask.bag.Bag or a dask.dataframe.Series of strings, got {type(texts).__name__}")


def _bad_item_message(position: int, partition: int, index: int, type_name: str, shown: str, label) -> str:
    where = f"texts[{position}] (item {index} of partition {partition}"
    where += f", index label {label!r})" if label is not None else ")"
    return f"{where} is {type_name} {shown}; every item must be a string"


# ----------------------------------------------------------------------------------------------------------------
# The worker side: tasks
# ----------------------------------------------------------------------------------------------------------------
def _items(part) -> tuple[list, object]:
    """The items of a partition as a list, and the index of a pandas partition (None for a Bag's)."""
    if hasattr(part, "tolist") and hasattr(part, "index"):  # a pandas Series
        return part.tolist(), part.index
    return list(part), None


def _first_bad(items: list, index) -> tuple | None:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            shown = repr(item)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            label = None if index is None else index[i]
            return i, type(item).__name__, shown, label.item() if hasattr(label, "item") else label
    return None


def _inspect(part) -> tuple[int, tuple | None]:
    """(number of items, None or (index, type name, repr, index label) of the first item that is not a string)."""
    items, index = _items(part)
    return len(items), _first_bad(items, index)


def _model_info(path: str, backend: str | None) -> int:
    """The model's width, from the worker's cached copy (loaded here if needed); checks it can embed text."""
    model = _worker_model(path, backend)
    return int(model.config.hidden_size)


def _encode_partition(part, path, backend, batch_size, normalize, partition, offset, expected, width) -> np.ndarray:
    """The embeddings (n, D) of one partition: one thread, the worker's cached model."""
    items, index = _items(part)
    bad = _first_bad(items, index)
    if bad is not None:
        raise TypeError(_bad_item_message(offset + bad[0], partition, *bad))
    if len(items) != expected:
        raise RuntimeError(
            f"partition {partition} of the corpus had {expected} items when counted and {len(items)} now: "
            "the input is not deterministic; persist() it before encode"
        )
    if not items:
        return np.empty((0, width), DTYPE)
    model = _worker_model(path, backend)
    with _one_thread():
        out = model.encode(items, batch_size=batch_size, normalize=normalize)
    return np.ascontiguousarray(out, dtype=DTYPE)


# ----------------------------------------------------------------------------------------------------------------
# The worker side: one model per process, one thread per task
# ----------------------------------------------------------------------------------------------------------------
_models: dict[tuple, object] = {}  # (path, backend, dtype) -> the model, loaded once per process
_loads: dict[tuple, int] = {}  # how many times each was loaded in this process (``_cache_info``)
_models_lock = threading.Lock()


def _where() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


def _load(path: str, backend: str | None):
    from . import BertModel, CheckpointError, load

    try:
        model = load(path, backend=backend, dtype=DTYPE)
    except (OSError, ValueError, ImportError, CheckpointError) as exc:
        message = f"{_where()} cannot load the model {path!r}: {exc}"
        try:
            error = type(exc)(message)
        except Exception:
            error = RuntimeError(message)
        raise error from None
    if not isinstance(model, BertModel):
        raise ValueError(f"{path} holds a {type(model).__name__}; encode needs an encoder (BERT family)")
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json (or the tokenizers package is missing on {_where()})")
    return model


def _worker_model(path: str, backend: str | None):
    """The process's model of ``path``, loaded once and shared by the worker's threads (the tokenizer serialises
    its own calls)."""
    key = (path, backend, DTYPE.name)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = _load(path, backend)
            _loads[key] = _loads.get(key, 0) + 1
    return model


def _cache_info() -> dict[str, int]:
    """Loads per cached model in this process, ``"path|backend|dtype" -> count`` (for tests and diagnostics)."""
    with _models_lock:
        return {"|".join(str(k) for k in key): n for key, n in _loads.items()}


_pin_lock = threading.Lock()
_pin_state: dict = {"depth": 0, "undo": None, "blas": None}


@contextlib.contextmanager
def _one_thread():
    """fastattn's kernels and the BLAS libraries on one thread while the tasks of this process run.

    fastattn's count is process-wide and the tasks of a process run side by side on its threads: the first task in
    sets it, the last one out restores it. BLAS (threadpoolctl) is set to one thread by the first task and stays so
    in this process (each task checks it, and sets it again if something raised it): with OpenBLAS, giving a
    process its threads back and then taking them away again changed the bits that later calls from other Python
    threads computed (OpenBLAS 0.3.31, this project's tests).
    Each Python thread's own OpenMP count is left alone: fastattn's OpenMP kernels follow fastattn's setting.
    """
    import fastattn

    with _pin_lock:
        if _pin_state["depth"] == 0:
            _pin_state["undo"] = fastattn.set_num_threads(1)  # first: it loads the backends' libraries
        if _pin_state["blas"] is None:
            import threadpoolctl

            _pin_state["blas"] = threadpoolctl.ThreadpoolController().select(user_api="blas")
        if any(lib["num_threads"] != 1 for lib in _pin_state["blas"].info()):
            _pin_state["blas"].limit(limits=1)
        _pin_state["depth"] += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_state["depth"] -= 1
            if _pin_state["depth"] == 0:
                setting, _pin_state["undo"] = _pin_state["undo"], None
                setting.__exit__(None, None, None)
