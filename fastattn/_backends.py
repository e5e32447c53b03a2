"""The backend registry: which backends exist, whether each can run and why not, and which one a call uses.

Precedence of the choice: the ``backend=`` argument > ``use_backend(...)`` > the ``FASTATTN_BACKEND`` environment
variable > automatic (the first available of ``PREFERENCE``). Probing is cheap and lazy: nothing is compiled and
Numba is not imported until a Numba kernel is first needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import threading

NAMES = ("numpy", "numba", "cython")
PREFERENCE = ("numba", "cython", "numpy")  # automatic choice: fastest first
ENV_VAR = "FASTATTN_BACKEND"

_MODULES = {
    "numpy": "fastattn._numpy_backend",
    "numba": "fastattn.kernels.numba",
    "cython": "fastattn.kernels.cython",
}
_KERNELS = ("gather", "gather_add_positions", "add_positions", "rope", "scores", "softmax", "weighted_sum", "attention")

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastattn_backend", default=None)
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}
_lock = threading.Lock()
_thread_setting: list[int | None] = [None]  # the count set by fastattn.set_num_threads, applied to each backend


def _probe(name: str) -> str | None:
    """None if ``name`` can run here, else the reason it cannot. Does not import Numba."""
    if name in _failed:
        return _failed[name]
    if name == "numpy" or name in _loaded:
        return None
    if name == "numba":
        if importlib.util.find_spec("numba") is None:
            return "numba is not installed (pip install numba)"
        try:
            spec = importlib.util.find_spec(_MODULES["numba"])
        except ImportError:
            spec = None
        if spec is None:
            return "the fastattn.kernels.numba package is missing from this installation"
        return None
    if name == "cython":
        try:
            mod = importlib.import_module(_MODULES["cython"])
        except ImportError as exc:  # the package itself is missing: a broken install
            return f"fastattn.kernels.cython could not be imported ({exc})"
        reason = getattr(mod, "UNAVAILABLE_REASON", None)
        if reason is None and not hasattr(mod, "attention"):
            reason = "the Cython extensions are not built in this installation"
        return reason
    raise AssertionError(name)


def backend_status() -> dict[str, str | None]:
    """Every known backend mapped to None (usable) or the reason it is unavailable.

    Examples
    --------
    >>> import fastattn
    >>> fastattn.backend_status()["numpy"] is None
    True
    """
    return {name: _probe(name) for name in NAMES}


def available_backends() -> list[str]:
    """Names of the backends that can run here, fastest first; ``"numpy"`` (the oracle) is always among them.

    Examples
    --------
    >>> import fastattn
    >>> "numpy" in fastattn.available_backends()
    True
    """
    return [name for name in PREFERENCE if _probe(name) is None]


def _unavailable_error(name: str, source: str) -> ValueError:
    available = ", ".join(repr(n) for n in available_backends())
    if name not in NAMES:
        known = ", ".join(repr(n) for n in NAMES)
        return ValueError(
            f"unknown backend {name!r} ({source}); known backends are {known}, available here: {available}"
        )
    return ValueError(f"backend {name!r} ({source}) is unavailable: {_probe(name)}; available here: {available}")


def _check_name(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string such as 'numba' or None, got {type(name).__name__} {name!r}")
    name = name.strip().lower()
    if name not in NAMES or _probe(name) is not None:
        raise _unavailable_error(name, source)
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: calls inside it use backend ``name`` unless they pass ``backend=`` themselves.

    It applies to the current thread (and asyncio task) only.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> with fastattn.use_backend("numpy"):
    ...     fastattn.embed(np.array([1]), np.eye(3, dtype=np.float32)).tolist()
    [[0.0, 1.0, 0.0]]
    """
    token = _chosen.set(_check_name(name, "given to use_backend"))
    try:
        yield name
    finally:
        _chosen.reset(token)


def resolve_name(backend: str | None = None) -> str:
    """The backend a call uses, by the documented precedence."""
    if backend is not None:
        return _check_name(backend, "given as backend=")
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"from the environment variable {ENV_VAR}")
    for name in PREFERENCE:
        if _probe(name) is None:
            return name
    return "numpy"


# Kernel families beyond the attention pipeline live in submodules of each backend (models' LayerNorm, GELU, ...).
_FAMILIES = {
    "blocks": {
        "numpy": "fastattn._numpy_blocks",
        "numba": "fastattn.kernels.numba.blocks",
        "cython": "fastattn.kernels.cython.blocks",
    },
}


def kernels(backend: str | None = None, family: str | None = None):
    """The kernel module of the backend a call uses (imported on first need).

    ``family=None`` is the attention pipeline of kernels/README.md; ``family="blocks"`` the transformer-block
    kernels used by ``fastattn.models``.
    """
    name = resolve_name(backend)
    key = name if family is None else f"{name}.{family}"
    mod = _loaded.get(key)
    if mod is not None:
        return mod
    with _lock:
        if key not in _loaded:
            module_name = _MODULES[name] if family is None else _FAMILIES[family][name]
            try:
                mod = importlib.import_module(module_name)
                missing = [k for k in _KERNELS if not hasattr(mod, k)] if family is None else []
                if missing:
                    raise ImportError(f"it lacks the kernels {missing}")
            except ImportError as exc:
                if family is not None:
                    raise ValueError(
                        f"backend {name!r} has no {family} kernels: importing {module_name} failed: {exc}"
                    ) from exc
                _failed[name] = f"importing {module_name} failed: {exc}"
                raise _unavailable_error(name, "on first use") from exc
            if _thread_setting[0] is not None and hasattr(mod, "set_num_threads"):
                mod.set_num_threads(_thread_setting[0])
            _loaded[key] = mod
    return _loaded[key]


def loaded_modules() -> dict[str, object]:
    return dict(_loaded)


def set_threads_everywhere(n: int) -> None:
    _thread_setting[0] = n
    for mod in _loaded.values():
        if hasattr(mod, "set_num_threads"):
            mod.set_num_threads(n)
