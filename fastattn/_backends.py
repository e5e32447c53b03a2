"""The backend registry: which backends exist, whether each can run and why not, and which one a call uses.

Precedence of the choice: the ``backend=`` argument > ``use_backend(...)`` > the ``FASTATTN_BACKEND`` environment
variable > automatic: the compiled backend ``python -m fastattn tune`` measured faster on this machine
(fastattn._plans), else the one measured faster on this CPU family (``_plans.BUILTIN_FASTER``), else the first
available of ``PREFERENCE``. Each compiled backend is configured with its settings
and its per-machine plan (tile products and tile shape of the fused attention; ``plan_info`` says which and why).
Probing is cheap and lazy: nothing is compiled and Numba is not imported until a Numba kernel is first needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
import threading
import warnings

from . import _plans, _settings
from ._optable import module_families, of_families

NAMES = ("numpy", "numba", "cython")
PREFERENCE = ("numba", "cython", "numpy")  # automatic choice where nothing was measured (numba: always built)
ENV_VAR = "FASTATTN_BACKEND"


# --------------------------------------------------------------------------------------------------------------
# Where each backend's kernels live: one module per backend for the attention pipeline (the embedding, positions
# and attention families of fastattn._optable) and one for the transformer blocks. Imported on first need.
# --------------------------------------------------------------------------------------------------------------
def _numpy_module(family: str):
    if family == "blocks":
        from . import _numpy_blocks as module
    else:
        from . import _numpy_backend as module
    return module


def _numba_module(family: str):
    if family == "blocks":
        from .kernels.numba import blocks as module
    else:
        from .kernels import numba as module
    return module


def _cython_module(family: str):
    if family == "blocks":
        from .kernels.cython import blocks as module
    else:
        from .kernels import cython as module
    return module


MODULES = {"numpy": _numpy_module, "numba": _numba_module, "cython": _cython_module}


def settings_for(name: str) -> dict:
    """The settings values a backend's ``configure`` takes. Raises ValueError naming a variable with a bad value."""
    if name == "numba":
        return {"tiles": _settings.get("FASTATTN_TILES")}
    if name == "cython":
        return {
            "tiles": _settings.get("FASTATTN_TILES"),
            "isa": _settings.get("FASTATTN_CYTHON_ISA"),
            "blas": _settings.get("FASTATTN_CYTHON_BLAS"),
        }
    return {}


def plan_values(name: str) -> dict:
    """The plan a compiled backend's ``configure`` takes now (fastattn._plans, at the current thread count): tile
    products, tile shape, and the per (dtype, head width) tuned plans; recorded for ``plan_info``."""
    if name not in _plans.COMPILED:
        return {}
    from ._threads import get_num_threads

    default, shaped = _plans.plans_for(name, get_num_threads())
    _plans_used[name] = (default, shaped)
    return {
        "tiles": default.tiles,
        "block_q": default.block_q,
        "block_k": default.block_k,
        "plans": {key: p.as_tuple() for key, p in shaped.items()},
    }


_plans_used: dict[str, tuple] = {}  # backend -> (default Plan, {(dtype, head width): Plan}) it was configured with


def _configure(name: str, module) -> None:
    """Hand the settings' values and this machine's plan to a freshly loaded backend module; a setting it cannot
    take is a ValueError that names the variable. A plan it cannot take (a cache from a machine with SciPy, say) is
    dropped with a warning for the built-in one."""
    values = settings_for(name)
    if not hasattr(module, "configure") or not (values or name in _plans.COMPILED):
        return
    try:
        module.configure(**{**values, **plan_values(name)})
        return
    except ValueError as exc:
        planned = _plans_used.get(name)
        if planned is None or not planned[0].source.startswith("tuned") and not planned[1]:
            shown = ", ".join(f"{_VARIABLE[k]}={v!r}" for k, v in values.items())
            raise ValueError(f"{shown}: {exc}") from None
        warnings.warn(f"fastattn: the tuned plan of backend {name!r} cannot run here ({exc}); using the built-in "
                      "one", RuntimeWarning, stacklevel=4)  # fmt: skip
    plan = _plans.builtin_plan(name, _plans._tiles_override())
    _plans_used[name] = (plan, {})
    try:
        fallback = {"tiles": plan.tiles, "block_q": plan.block_q, "block_k": plan.block_k, "plans": {}}
        module.configure(**{**values, **fallback})
    except ValueError as exc:
        shown = ", ".join(f"{_VARIABLE[k]}={v!r}" for k, v in values.items())
        raise ValueError(f"{shown}: {exc}") from None


def refresh_plans() -> None:
    """Read the plan cache again and hand every loaded compiled backend its plan for the current thread count
    (after ``tune`` stored new plans, or ``set_num_threads`` changed the count the plans are keyed by)."""
    _plans.forget()
    _auto_cache.clear()
    for (name, part), mod in list(_loaded.items()):
        if part == "pipeline" and name in _plans.COMPILED:
            _configure(name, mod)


_VARIABLE = {"tiles": "FASTATTN_TILES", "isa": "FASTATTN_CYTHON_ISA", "blas": "FASTATTN_CYTHON_BLAS"}


def missing_kernels(module, family: str) -> list[str]:
    """Operations of the table the backend module for ``family`` neither implements nor explains in ``UNSUPPORTED``."""
    unsupported = getattr(module, "UNSUPPORTED", {})
    return [
        op.name
        for op in of_families(module_families(family))
        if not callable(getattr(module, op.name, None)) and op.name not in unsupported
    ]


_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastattn_backend", default=None)
_loaded: dict[tuple[str, str], object] = {}  # (backend, "pipeline" | "blocks") -> configured module
_failed: dict[str, str] = {}
_lock = threading.Lock()


def _probe(name: str) -> str | None:
    """None if ``name`` can run here, else the reason it cannot. Does not import Numba."""
    if name in _failed:
        return _failed[name]
    try:
        settings_for(name)
    except ValueError as exc:  # a bad setting: this backend cannot run until it is fixed
        return str(exc)
    if name == "numpy" or (name, "pipeline") in _loaded:
        return None
    if name == "numba":
        if importlib.util.find_spec("numba") is None:
            return "numba is not installed (pip install numba)"
        try:
            spec = importlib.util.find_spec("fastattn.kernels.numba")
        except ImportError:
            spec = None
        if spec is None:
            return "the fastattn.kernels.numba package is missing from this installation"
        return None
    if name == "cython":
        try:
            mod = _cython_module("pipeline")
        except Exception as exc:  # missing, or broken while importing: a broken install, never a crash here
            _failed[name] = f"fastattn.kernels.cython could not be imported ({type(exc).__name__}: {exc})"
            return _failed[name]
        return getattr(mod, "UNAVAILABLE_REASON", None)
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
    return [name for name in automatic_order()[0] if _probe(name) is None]


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
    env = os.environ.get(ENV_VAR, "").strip()  # read raw: an unknown name gets the registry's fuller message
    if env:
        return _check_name(env, f"from the environment variable {ENV_VAR}")
    for name in automatic_order()[0]:
        if _probe(name) is None:
            if _fork_skipped and not _fork_warned:
                _fork_warned.append(name)
                skipped = "; ".join(f"{n!r}: {_failed[n]}" for n in _fork_skipped)
                warnings.warn(f"fastattn uses backend {name!r} in this forked process because {skipped}",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
            return name
    return "numpy"


_auto_cache: dict = {}  # (threads, plan cache path) -> (order, why)


def automatic_order() -> tuple[tuple[str, ...], str]:
    """The order the automatic choice tries the backends in, and why: the compiled backend measured faster on this
    machine by ``python -m fastattn tune`` first (at the current thread count), else the one measured faster on this
    CPU family (``fastattn._plans.BUILTIN_FASTER``), else ``PREFERENCE``."""
    from ._threads import get_num_threads

    threads = get_num_threads()
    key = (threads, _plans.cache_path())
    hit = _auto_cache.get(key)
    if hit is None:
        faster, why = _plans.preferred_backend(threads, _plans.COMPILED)
        if faster is None:
            faster, why = _plans.builtin_faster(_plans.COMPILED)
            untuned = f"nothing measured on this machine at {threads} threads: run `python -m fastattn tune`"
            if faster is None:
                why = f"first available of the preference order {', '.join(PREFERENCE)} ({untuned})"
            else:
                why = f"{why}; {untuned}"
        if faster is None:
            order = PREFERENCE
        else:
            order = (faster,) + tuple(n for n in PREFERENCE if n != faster)
        hit = _auto_cache[key] = (order, why)
    return hit


def plan_info() -> dict:
    """Which plan each compiled backend's fused attention runs on this machine, where it came from, and why the
    automatic choice is the backend it is.

    A plan is the tile products (``micro``/``blas``/``loops``) and the tile shape (query rows x keys); it changes
    speed, never results beyond rounding. ``source`` is ``"tuned <date>"`` (by ``python -m fastattn tune``, read from
    the plan cache), ``"built-in default for AMD Zen"`` (or Intel, other CPUs), or names ``FASTATTN_TILES`` when that
    is set. Nothing is compiled; a backend not loaded yet shows the plan it would get.

    Examples
    --------
    >>> import fastattn
    >>> info = fastattn.plan_info()
    >>> sorted(info)
    ['automatic', 'backends', 'cache', 'cache_status', 'machine', 'why']
    """
    from ._threads import get_num_threads

    threads = get_num_threads()
    backends = {}
    for name in _plans.COMPILED:
        reason = _probe(name)
        if reason is not None:
            backends[name] = {"unavailable": reason}
            continue
        planned = _plans_used.get(name) if (name, "pipeline") in _loaded else None
        default, shaped = planned if planned is not None else _plans.plans_for(name, threads)
        backends[name] = {
            "plan": default.describe(),
            "tiles": default.tiles,
            "block_q": default.block_q,
            "block_k": default.block_k,
            "source": default.source,
            "per_shape": {f"{dt} d={d}": f"{p.describe()} ({p.source})" for (dt, d), p in sorted(shaped.items())},
        }
        if name == "cython" and shaped:
            backends[name]["note"] = "one tile shape serves every call of this backend (the plan above)"
    order, why = automatic_order()
    automatic = next((n for n in order if _probe(n) is None), "numpy")
    return {
        "machine": _plans.machine(),
        "cache": _plans.cache_path(),
        "cache_status": _plans.cached_entries()[1],
        "backends": backends,
        "automatic": automatic,
        "why": why if automatic == order[0] else f"{automatic}: the first available ({order[0]}: {_probe(order[0])})",
    }


def kernels(backend: str | None = None, family: str | None = None):
    """The configured kernel module of the backend a call uses for ``family`` (imported on first need).

    ``family`` is a family of ``fastattn._optable`` (``None``: the attention pipeline: embedding, positions,
    attention); ``"blocks"`` is the transformer-block kernels used by ``fastattn.models``.
    """
    name = resolve_name(backend)
    part = "blocks" if family == "blocks" else "pipeline"
    mod = _loaded.get((name, part))
    if mod is not None:
        return mod
    with _lock:
        if (name, part) not in _loaded:
            try:
                mod = MODULES[name](part)
                _configure(name, mod)
                missing = missing_kernels(mod, part)
                if missing:
                    raise ImportError(f"it lacks the kernels {missing}")
            except Exception as exc:  # ImportError, or any error raised while the module runs: unavailable
                where = f"the {part} kernels of backend {name!r}"
                if part == "blocks":
                    raise ValueError(f"backend {name!r} has no blocks kernels: loading {where} failed: {exc}") from exc
                _failed[name] = f"loading {where} failed: {exc}"
                raise _unavailable_error(name, "on first use") from exc
            from . import _threads

            _threads.apply_to(name, mod)
            _loaded[(name, part)] = mod
    return _loaded[(name, part)]


def loaded_modules() -> dict[tuple[str, str], object]:
    return dict(_loaded)


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
        getattr(mod, "openmp_enabled", lambda: True)() for key, mod in _loaded.items() if key[0] == "cython"
    )
    if not (numba_gnu or cython_omp):  # no GNU OpenMP thread pool can have started in the parent
        return
    _fork_serial.add("cython")  # loaded now or later, the Cython kernels run on one thread here
    for key, mod in _loaded.items():
        if key[0] == "cython" and hasattr(mod, "set_num_threads"):
            mod.set_num_threads(1)
    # Numba: its omp layer ran in the parent (it would terminate this process), or has not started yet and would
    # most likely be omp over the pool the Cython kernels started (it would hang). tbb and workqueue are fork safe.
    if (numba_gnu or (layer is None and not _numba_fork_safe_by_choice())) and _probe("numba") is None:
        _failed["numba"] = (
            "this process was forked from a parent whose GNU OpenMP runtime had (or may have) started its threads, "
            f"and Numba's OpenMP threading layer would hang or be terminated in such a child; {_FORK_FIX}"
        )
        _fork_skipped.append("numba")
        for key in [k for k in _loaded if k[0] == "numba"]:
            del _loaded[key]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
