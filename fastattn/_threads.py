"""The one owner of the compiled backends' thread count, and ahead-of-time compilation (``warmup``).

The count is process-wide: ``set_num_threads`` records it here and hands it to every loaded compiled backend (the
registry hands it to each one it loads later, ``apply_to``); the kernels read it from their backend's state, which
nothing else writes. ``local_threads`` is the other way in: an override for the calling Python thread only, which
``fastattn.models`` uses to run tiny decode steps on one thread without changing what concurrent calls from other
threads use.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from . import _backends, _validation

_count: list[int | None] = [None]  # the count set by set_num_threads (None: the default)


def _default_threads() -> int:
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def get_num_threads() -> int:
    """The number of threads the compiled kernels use.

    ``NUMBA_NUM_THREADS`` (or ``OMP_NUM_THREADS``) sets the default, else all cores; ``set_num_threads`` changes it.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.get_num_threads() >= 1
    True
    """
    current = _count[0]
    return _default_threads() if current is None else current


def _for_backend(name: str, n: int | None) -> int | None:
    return 1 if name in _backends._fork_serial else n


def apply_to(name: str, module) -> None:
    """Give a backend module the registry just loaded the process-wide count (one thread in a forked child)."""
    n = _for_backend(name, _count[0])
    if n is not None and hasattr(module, "set_num_threads"):
        module.set_num_threads(n)


def _set_everywhere(n: int) -> None:
    """Apply ``n`` threads to every compiled backend, or to none: a count one backend refuses (Numba: more than
    ``NUMBA_NUM_THREADS``) raises here and changes nothing, instead of breaking that backend's first use later.

    The available compiled backends are loaded first (imported, nothing compiled) so that each can judge ``n`` now.
    """
    for name in _backends.available_backends():
        if name != "numpy":
            try:
                _backends.kernels(name)
            except ValueError:  # it could not be imported: now reported unavailable, nothing to set
                pass
    applied = []
    try:
        for (name, _part), mod in _backends.loaded_modules().items():
            if hasattr(mod, "set_num_threads"):
                before = mod.get_num_threads() if hasattr(mod, "get_num_threads") else None
                mod.set_num_threads(_for_backend(name, n))
                applied.append((mod, before))
    except Exception:
        for mod, before in applied:
            if before is not None:
                mod.set_num_threads(before)
        raise
    changed = _count[0] != n
    _count[0] = n
    if changed:  # the plans are keyed by thread count
        _backends.refresh_plans()


class set_num_threads:  # noqa: N801 - a function to the user, a class only to be usable with ``with``
    """Set the number of threads of every compiled backend; usable as a context manager that restores it.

    Parameters
    ----------
    n : int
        Threads, at least 1. Numba cannot go beyond the ``NUMBA_NUM_THREADS`` it started with.

    Examples
    --------
    >>> import fastattn
    >>> with fastattn.set_num_threads(1):
    ...     fastattn.get_num_threads()
    1
    """

    def __init__(self, n: int):
        n = _validation.positive_int("n", n)
        self._previous = _count[0]
        _set_everywhere(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        previous = self._previous if self._previous is not None else _default_threads()
        _set_everywhere(previous)
        if _count[0] != self._previous:
            _count[0] = self._previous
            _backends.refresh_plans()
        return False


@contextlib.contextmanager
def local_threads(n: int, *modules):
    """Inside the block, the kernels of ``modules`` launched from the calling thread run on ``n`` threads; other
    threads' calls keep the process-wide count. Modules without per-thread counts (the numpy backend) are skipped."""
    saved = []
    try:
        for module in dict.fromkeys(modules):
            if hasattr(module, "set_local_threads"):
                saved.append((module, module.set_local_threads(n)))
        yield
    finally:
        for module, previous in reversed(saved):
            module.set_local_threads(previous)


def warmup(backends=None, dtypes=("float32", "float64")) -> dict[str, float]:
    """Compile the kernels of the JIT backends ahead of use; returns seconds spent per backend.

    Every kernel of the table runs once on tiny arrays, through the call layer the API uses (so with the same types
    and layouts: contiguous and broadcast masks), for each dtype; the block kernels through their module's own
    ``warmup``. With Numba's on-disk cache, a later process then loads the machine code instead of compiling.

    Examples
    --------
    >>> import fastattn
    >>> sorted(fastattn.warmup(backends=["numpy"]))
    ['numpy']
    """
    import time

    names = _backends.available_backends() if backends is None else list(backends)
    spent = {}
    for name in names:
        kern = _backends.kernels(name)
        start = time.perf_counter()
        if name != "numpy":  # the oracle compiles nothing
            for dtype in dtypes:
                _warm_pipeline(kern, np.dtype(dtype))
            try:
                blocks = _backends.kernels(name, family="blocks")
            except ValueError:  # no block kernels in this installation: nothing to compile
                blocks = None
            if hasattr(blocks, "warmup"):
                blocks.warmup(dtypes=tuple(dtypes))
        spent[name] = time.perf_counter() - start
    return spent


def _warm_pipeline(kern, dt: np.dtype) -> None:
    """Each pipeline kernel once, on tiny arrays of ``dt``, with the argument types the API passes."""
    from . import _call

    B, H, L, E, V, D = 1, 2, 3, 4, 5, 6
    ids = np.zeros((1, 2 * L), dtype=np.int64)
    table = np.zeros((V, D), dt)
    pos = np.zeros((2 * L, D), dt)
    _call.gather(kern, ids, table)
    _call.gather_add_positions(kern, ids, table, pos)
    x = np.zeros((B, L, D), dt)
    _call.add_positions(kern, x, pos, 0)
    _call.rope(kern, x, 0, 10000.0, False)
    q = np.zeros((B, H, L, E), dt)
    kv = np.zeros((B, 1, L, E), dt)
    masks = [None, np.zeros((B, H, L, L), dt), np.broadcast_to(np.zeros((1, 1, L, L), dt), (B, H, L, L))]
    biases = [None, np.zeros((B, L), dt), np.broadcast_to(np.zeros((1, L), dt), (B, L))]
    for mask in masks:
        for bias in biases:
            s = _call.scores(kern, q, kv, 1.0, True, 0, mask, bias)
            out, lse = _call.attention(kern, q, kv, kv, 1.0, True, 0, mask, bias, want_lse=True)
            _call.attention_backward(kern, q, q, kv, kv, out, lse, 1.0, True, 0, mask, bias)
    rows = s.reshape(-1, L)
    kern.softmax(rows, rows)
    kern.weighted_sum(np.zeros_like(q), s, kv)
    n1 = 1025  # decoding over many keys: the compiled backends split the keys across threads past 1024 keys
    q1, kv1 = np.zeros((B, H, 1, E), dt), np.zeros((B, 1, n1, E), dt)
    for mask in (None, np.zeros((B, H, 1, n1), dt)):
        for bias in (None, np.zeros((B, n1), dt)):
            _call.attention(kern, q1, kv1, kv1, 1.0, True, n1 - 1, mask, bias)
    g = np.empty_like(s)
    kern.softmax_backward(g.reshape(-1, L), rows, rows)
    kern.scores_backward(np.empty_like(q), np.empty_like(kv), s, q, kv, 1.0)
    kern.weighted_sum_backward(g, np.empty_like(kv), q, s, kv)
    kern.gather_backward(np.empty_like(table), np.zeros((2 * L, D), dt), ids.reshape(-1))
    kern.add_positions_backward(np.empty_like(pos), x, 0)
