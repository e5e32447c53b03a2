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
import sys
import threading
import warnings

NAMES = ("numpy", "numba", "cython")
PREFERENCE = ("numba", "cython", "numpy")  # automatic choice: fastest first
ENV_VAR = "FASTATTN_BACKEND"

_MODULES = {
    "numpy": "fastattn._numpy_backend",
    "numba": "fastattn.kernels.numba",
    "cython": "fastattn.kernels.cython",
}
_KERNELS = ("gather", "gather_add_positions", "add_positions", "rope", "scores", "softmax", "weighted_sum", "attention")
#: The backward kernels (CONTRACT.md); a backend without them serves the forward pass only.
BACKWARD_KERNELS = ("attention_backward", "softmax_backward", "scores_backward", "weighted_sum_backward",
                    "gather_backward", "add_positions_backward")  # fmt: skip

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
        except Exception as exc:  # missing, or broken while importing: a broken install, never a crash here
            _failed[name] = f"fastattn.kernels.cython could not be imported ({type(exc).__name__}: {exc})"
            return _failed[name]
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
            if _fork_skipped and not _fork_warned:
                _fork_warned.append(name)
                skipped = "; ".join(f"{n!r}: {_failed[n]}" for n in _fork_skipped)
                warnings.warn(f"fastattn uses backend {name!r} in this forked process because {skipped}",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
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
            except Exception as exc:  # ImportError, or any error raised while the module runs: unavailable
                if family is not None:
                    raise ValueError(
                        f"backend {name!r} has no {family} kernels: importing {module_name} failed: {exc}"
                    ) from exc
                _failed[name] = f"importing {module_name} failed: {exc}"
                raise _unavailable_error(name, "on first use") from exc
            if name == "cython" and family is None:  # TEMPORARY until cython-backward merges
                from ._cython_compat import adapt

                mod = adapt(mod)
            if hasattr(mod, "set_num_threads") and (_thread_setting[0] is not None or name in _fork_serial):
                mod.set_num_threads(_threads_for(name, _thread_setting[0]))
            _loaded[key] = mod
    return _loaded[key]


def loaded_modules() -> dict[str, object]:
    return dict(_loaded)


def set_threads_everywhere(n: int) -> None:
    """Apply ``n`` threads to every backend, or to none: a count one backend refuses (Numba: more than
    ``NUMBA_NUM_THREADS``) raises here and changes nothing, instead of breaking that backend's first use later.

    The available compiled backends are loaded first (imported, nothing compiled) so that each can judge ``n`` now.
    """
    for name in available_backends():
        if name != "numpy":
            try:
                kernels(name)
            except ValueError:  # it could not be imported: now reported unavailable, nothing to set
                pass
    applied = []
    try:
        for key, mod in list(_loaded.items()):
            if hasattr(mod, "set_num_threads"):
                before = mod.get_num_threads() if hasattr(mod, "get_num_threads") else None
                mod.set_num_threads(_threads_for(key.split(".")[0], n))
                applied.append((mod, before))
    except Exception:
        for mod, before in applied:
            if before is not None:
                mod.set_num_threads(before)
        raise
    _thread_setting[0] = n


# --------------------------------------------------------------------------------------------------------------
# fork
# --------------------------------------------------------------------------------------------------------------
# GNU OpenMP (libgomp, used by the Cython kernels and by Numba's "omp" threading layer) is not fork safe: in a child
# forked after the parent's OpenMP thread pool started, a parallel region with more than one thread hangs forever,
# and Numba's omp layer terminates the child instead (SIGTERM). A team of one thread never touches the pool, so:
#   - cython: keeps working in such a child, on one thread (``_fork_serial``);
#   - numba: reported unavailable in the child, with the reason and the fix (the spawn start method); the automatic
#     choice moves on to the next backend and says so once (RuntimeWarning).
# Numba's "tbb" and "workqueue" layers are fork safe and are left alone.
_FORK_FIX = (
    "start worker processes with multiprocessing.get_context('spawn') (or 'forkserver'), or fork them before the "
    "parent first runs a fastattn kernel"
)
_fork_serial: set[str] = set()  # backends held to one thread in this forked process
_fork_skipped: list[str] = []  # backends made unavailable by the fork
_fork_warned: list[str] = []


def _threads_for(name: str, n: int | None) -> int | None:
    return 1 if name in _fork_serial else n


def _numba_layer() -> tuple[str | None, bool]:
    """Numba's threading layer if its threads were started (else None), and whether it is GNU OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None, False
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None, False
    if layer != "omp":
        return layer, False
    vendor = getattr(sys.modules.get("numba.np.ufunc.omppool"), "openmp_vendor", "GNU")
    return layer, vendor == "GNU"


def _numba_fork_safe_by_choice() -> bool:
    """Whether the Numba threading layer chosen (but not yet started) is one that survives a fork."""
    config = sys.modules.get("numba.core.config")
    chosen = getattr(config, "THREADING_LAYER", None) or os.environ.get("NUMBA_THREADING_LAYER", "default")
    return str(chosen).lower() in ("tbb", "safe", "forksafe", "workqueue")


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork: it never releases it here
    layer, numba_gnu = _numba_layer()
    cython_omp = any(
        getattr(mod, "openmp_enabled", lambda: True)() for key, mod in _loaded.items() if key.split(".")[0] == "cython"
    )
    if not (numba_gnu or cython_omp):  # no GNU OpenMP thread pool can have started in the parent
        return
    _fork_serial.add("cython")  # loaded now or later, the Cython kernels run on one thread here
    for key, mod in _loaded.items():
        if key.split(".")[0] == "cython" and hasattr(mod, "set_num_threads"):
            mod.set_num_threads(1)
    # Numba: its omp layer ran in the parent (it would terminate this process), or has not started yet and would
    # most likely be omp over the pool the Cython kernels started (it would hang). tbb and workqueue are fork safe.
    if (numba_gnu or (layer is None and not _numba_fork_safe_by_choice())) and _probe("numba") is None:
        _failed["numba"] = (
            "this process was forked from a parent whose GNU OpenMP runtime had (or may have) started its threads, "
            f"and Numba's OpenMP threading layer would hang or be terminated in such a child; {_FORK_FIX}"
        )
        _fork_skipped.append("numba")
        for key in [k for k in _loaded if k.split(".")[0] == "numba"]:
            del _loaded[key]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
