"""Thread count for the compiled backends, and ahead-of-time compilation (``warmup``)."""

from __future__ import annotations

import os

from . import _backends, _validation


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
    current = _backends._thread_setting[0]
    return _default_threads() if current is None else current


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
        self._previous = _backends._thread_setting[0]
        _backends.set_threads_everywhere(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        previous = self._previous if self._previous is not None else _default_threads()
        _backends.set_threads_everywhere(previous)
        _backends._thread_setting[0] = self._previous
        return False


def warmup(backends=None, dtypes=("float32", "float64")) -> dict[str, float]:
    """Compile the kernels of the JIT backends ahead of use; returns seconds spent per backend.

    With Numba's on-disk cache, a later process then loads the machine code instead of compiling.

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
        mod = _backends.kernels(name)
        start = time.perf_counter()
        if hasattr(mod, "warmup"):
            mod.warmup(dtypes=tuple(dtypes))
        spent[name] = time.perf_counter() - start
    return spent
