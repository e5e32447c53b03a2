"""Settings shared by every Numba kernel: fastmath flags, the cache folder, threads, and BLAS.

This is the one place that decides

- ``FASTMATH``: the LLVM fast-math flags of every kernel. ``nnan`` and ``ninf`` are left out on purpose: masks
  hold ``-inf`` and a NaN in a query row must stay visible, so the compiler may not assume either away.
- where Numba writes its on-disk cache (``cache=True``). When the installed package folder is not writable and the
  user did not set ``NUMBA_CACHE_DIR``, we point it at ``~/.cache/fastattn/numba`` (or ``$XDG_CACHE_HOME``).
  This must happen before ``numba`` is first imported, which is why ``__init__`` imports this module first.
- how many threads the kernels use (``get_num_threads`` / ``set_num_threads``: process-wide, bounded by
  ``NUMBA_NUM_THREADS``, set by fastattn._threads, the one owner; ``set_local_threads``: an override for the calling
  Python thread only; ``use_num_threads`` applies the right one in the calling thread before each launch) and how
  kernels are launched (``launch``: serialised when Numba fell back to its non-thread-safe "workqueue" layer).
- the plan of the fused attention (``PLAN``/``PLANS``: tile products and tile shape, set by ``configure``: the
  registry passes this machine's plans, fastattn._plans, and ``FASTATTN_TILES``; this module never reads fastattn's
  settings from the environment); for the optional "blas"
  tiles, that SciPy's BLAS runs single-threaded, so that it does not oversubscribe the cores inside our ``prange``.
- that Numba's first use in a process does not import ``scipy.linalg`` (``load_registries``): a third of the first
  call's time, for a BLAS that the default kernels never call.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import operator
import os
import sys
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastattn", "numba")


# Numba writes its cache next to the source (``__pycache__``) unless told otherwise; a system-wide install is often
# read-only, so fall back to a per-user folder. Only when the user has not chosen one.
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(_HERE, os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = _user_cache_dir()

import numba  # noqa: E402  (after NUMBA_CACHE_DIR is settled)

#: Fast-math flags of every kernel (never ``nnan``/``ninf``: masks use ``-inf``, NaN must propagate).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Keyword arguments of every parallel kernel: ``@njit(**PARALLEL)``.
PARALLEL = {"parallel": True, "cache": True, "fastmath": FASTMATH, "nogil": True}

#: Keyword arguments of the small helpers the kernels inline.
HELPER = {"cache": True, "fastmath": FASTMATH}


# Numba's thread count is per Python thread; ours is process-wide: set_num_threads records it here and every kernel
# wrapper applies it in the thread that calls it (use_num_threads). None: Numba's own setting (NUMBA_NUM_THREADS).
# A thread may override it for its own launches (set_local_threads: fastattn.models runs small decode steps on one
# thread that way, without changing what concurrent calls from other threads use).
_threads = {"n": None}
_local = threading.local()


def get_num_threads() -> int:
    """Number of threads the Numba kernels use in the calling thread."""
    n = getattr(_local, "n", None) or _threads["n"]
    return numba.get_num_threads() if n is None else n


def use_num_threads() -> int:
    """Apply the calling thread's count (its override, else the process-wide one); return it. Every kernel wrapper
    calls this before it launches."""
    n = getattr(_local, "n", None) or _threads["n"]
    if n is None:
        return numba.get_num_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def set_local_threads(n: int | None):
    """Launch the calling thread's kernels on ``n`` threads (None: the process-wide count again); returns the
    previous override. Other Python threads are not affected."""
    previous = getattr(_local, "n", None)
    _local.n = None if n is None else _checked_count(n)
    return previous


# Numba's "workqueue" threading layer (used when neither TBB nor OpenMP loads) aborts the interpreter when two
# Python threads launch parallel kernels at once. Kernels are therefore launched through ``launch``: serialised
# until the first launch tells which layer Numba picked, and for good if it is workqueue.
_launch_lock = threading.Lock()
_layer_is_threadsafe = [False]


def launch(kernel, *args):
    """Call the compiled ``kernel(*args)``, serialised unless Numba's threading layer is thread-safe."""
    if _layer_is_threadsafe[0]:
        return kernel(*args)
    with _launch_lock:
        result = kernel(*args)
        try:
            _layer_is_threadsafe[0] = numba.threading_layer() != "workqueue"
        except ValueError:  # no parallel region launched yet
            pass
        return result


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in every kernel from now on, whichever Python thread calls it.

    1 <= n <= ``NUMBA_NUM_THREADS`` (the number of cores unless that environment variable says otherwise).
    """
    n = _checked_count(n)
    numba.set_num_threads(n)
    _threads["n"] = n


def _checked_count(n) -> int:
    n_max = numba.config.NUMBA_NUM_THREADS
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads expects an int, got: {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"set_num_threads expects n >= 1, got: n={n}")
    if n > n_max:
        raise ValueError(
            f"set_num_threads expects n <= NUMBA_NUM_THREADS={n_max}, got: n={n}; "
            "set the environment variable NUMBA_NUM_THREADS before starting Python to allow more"
        )
    return n


# --------------------------------------------------------------------------------------------------------------
# Numba's registries, loaded without scipy.linalg
# --------------------------------------------------------------------------------------------------------------
# The first compile or cache load of a process makes Numba load its CPU registries (numba.core.cpu:
# load_additional_registries). One of them, numba.np.arraymath, imports scipy.linalg.cython_blas at import only to
# learn whether BLAS exists (``_HAVE_BLAS``, read when np.correlate / np.convolve are compiled); and importing that
# imports the whole of scipy.linalg (0.1-0.25 s here, up to a third of the first call with a warm cache). No default
# kernel calls BLAS. So ``load_registries`` loads the registries once, with scipy.linalg made unimportable for the
# loading thread only (a finder on sys.meta_path that refuses it; other threads import it as usual), and then sets
# ``_HAVE_BLAS`` to what Numba would have found. np.dot itself (the "blas" tiles) is unaffected: Numba imports
# scipy.linalg.cython_blas when it compiles np.dot, and its C helpers when they first run. Should anything go
# wrong, or Numba change, the next compile loads the registries the ordinary way (SciPy included): slower, not
# different.
class _RefuseScipyLinalg:
    """A meta-path finder that makes ``scipy.linalg`` (and below) unimportable in one thread."""

    def __init__(self, thread_id: int):
        self.thread_id = thread_id

    def find_spec(self, name, path=None, target=None):
        if (name == "scipy.linalg" or name.startswith("scipy.linalg.")) and threading.get_ident() == self.thread_id:
            raise ImportError(f"{name}: not imported while fastattn loads Numba's registries")
        return None


def _scipy_has_cython_blas() -> bool:
    """Whether SciPy's ``linalg/cython_blas`` extension is installed (what Numba's own probe would import)."""
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.origin:
        return False
    names = ("cython_blas" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return any(os.path.exists(os.path.join(os.path.dirname(spec.origin), "linalg", name)) for name in names)


def load_registries() -> bool:
    """Load Numba's CPU registries now, without importing scipy.linalg (see above). Once per process, before the
    first kernel call (``__init__`` calls it); returns whether scipy.linalg was kept out."""
    if numba.config.DISABLE_JIT or "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return False  # nothing will compile, loaded already, or scipy.linalg is there anyway: nothing to save
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target

    refuse = _RefuseScipyLinalg(threading.get_ident())
    try:
        with global_compiler_lock:
            # new lists, not insert/remove: another thread may be iterating over the old one in an import
            sys.meta_path = [refuse, *sys.meta_path]
            try:
                cpu_target.target_context.refresh()
            finally:
                sys.meta_path = [f for f in sys.meta_path if f is not refuse]
    except Exception:  # noqa: BLE001 - the first compile refreshes again, the ordinary way
        pass
    arraymath = sys.modules.get("numba.np.arraymath")  # imported before anything failed, or not at all
    if getattr(arraymath, "_HAVE_BLAS", None) is False and _scipy_has_cython_blas():
        arraymath._HAVE_BLAS = True  # what numba.np.arraymath._check_blas would have found
    return arraymath is not None and "scipy.linalg" not in sys.modules


# --------------------------------------------------------------------------------------------------------------
# BLAS inside the fused kernel
# --------------------------------------------------------------------------------------------------------------
#: ``np.dot`` inside ``@njit`` needs SciPy (Numba calls ``scipy.linalg.cython_blas``). Probed, not imported.
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None

#: The tile products of the fused attention (see ``attention_fused.py``): "micro" (the register-blocked micro-kernel
#: of ``_gemm.py``), "blas" or "loops".
TILE_PRODUCTS = ("micro", "blas", "loops")

#: The plan of the fused attention (tile products, query rows per tile, keys per tile) of every call that no entry
#: of ``PLANS`` (dtype name, head width) -> plan matches. ``configure`` sets both from the registry's per-machine
#: plans (fastattn._plans); results do not depend on them beyond rounding.
PLAN = ("micro", 192, 384)
PLANS: dict = {}
TILES = PLAN[0]


def _checked_plan(tiles, block_q, block_k) -> tuple[str, int, int]:
    if tiles not in TILE_PRODUCTS:
        raise ValueError(f"tile products must be one of {', '.join(TILE_PRODUCTS)}, got {tiles!r}")
    if tiles == "blas" and not HAVE_SCIPY:
        raise ValueError("blas tiles need SciPy (Numba's np.dot calls its BLAS); install scipy")
    bq, bk = operator.index(block_q), operator.index(block_k)
    if bq < 1 or bk < 1:
        raise ValueError(f"tile shape must be at least 1x1 (query rows x keys), got {bq}x{bk}")
    return tiles, bq, bk


def configure(*, tiles: str = "micro", block_q: int = 192, block_k: int = 384, plans: dict | None = None) -> None:
    """The plan of the fused attention: tile products (``FASTATTN_TILES``) and tile shape, and per (dtype name,
    head width) plans ``(tiles, block_q, block_k)`` that override it. Raises ValueError for a plan that cannot run
    here (nothing changes then)."""
    global PLAN, PLANS, TILES
    plan = _checked_plan(tiles, block_q, block_k)
    shaped = {(str(dt), int(d)): _checked_plan(*p) for (dt, d), p in (plans or {}).items()}
    PLAN, PLANS, TILES = plan, shaped, plan[0]


def plan_for(dtype, head_dim: int) -> tuple[str, int, int]:
    """The plan of one fused-attention call: its (dtype, head width) entry, else ``PLAN``."""
    return PLANS.get((dtype.name, head_dim), PLAN) if PLANS else PLAN


def plan_state():
    """The whole plan state, for ``restore_plan`` (tests force odd plans and put this back)."""
    return PLAN, dict(PLANS)


def restore_plan(state) -> None:
    global PLAN, PLANS, TILES
    PLAN, PLANS = state[0], dict(state[1])
    TILES = PLAN[0]


_blas_state = {"limited": False, "how": "not yet"}


def limit_scipy_blas_threads() -> str:
    """Make SciPy's BLAS single-threaded, once per process; return how it was done.

    Our ``prange`` already uses every core; a multi-threaded BLAS called from each of those threads would start its
    own threads on top (oversubscription: 10x slower at N=128 in a trial). Only SciPy's BLAS is limited, because it
    is the one Numba's ``np.dot`` calls; NumPy's own BLAS (a separate library in NumPy >= 2 wheels) is left alone
    (``fastattn.kernels._scipy_blas`` tells them apart; where both use one shared library, it is limited).
    The price: ``scipy.linalg`` calls in the same process also run on one thread afterwards.

    Uses ``threadpoolctl`` when installed (portable); otherwise calls ``openblas_set_num_threads`` on the OpenBLAS
    that ``scipy.linalg.cython_blas`` loaded (the SciPy wheels ship OpenBLAS).
    """
    if _blas_state["limited"]:
        return _blas_state["how"]
    _blas_state["limited"] = True
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS, as Numba will)

    from .._scipy_blas import scipy_libraries

    how = "failed: BLAS thread count unchanged"
    try:
        from threadpoolctl import ThreadpoolController

        blas = [m for m in ThreadpoolController().lib_controllers if m.user_api == "blas"]
        scipys = set(scipy_libraries(m.filepath for m in blas))
        mine = [m for m in blas if m.filepath in scipys]
        for m in mine:
            m.set_num_threads(1)
        if mine:
            how = "threadpoolctl: " + ", ".join(os.path.basename(m.filepath) for m in mine)
    except Exception:  # threadpoolctl missing or too old: fall back to OpenBLAS's own entry point
        how = _limit_openblas_ctypes() or how
    _blas_state["how"] = how
    return how


def _limit_openblas_ctypes() -> str | None:
    import ctypes

    from .._scipy_blas import loaded_libraries, scipy_libraries

    paths = [p for p in scipy_libraries(loaded_libraries()) if "openblas" in os.path.basename(p).lower()]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: this returns the same handle
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads",
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
        ):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(1)
                return f"ctypes: {name} in {os.path.basename(path)}"
    return None


def blas_info() -> dict:
    """How the fused attention computes its tile products (for diagnostics and benchmark reports)."""
    return {
        "tiles": TILES,
        "tile_shape": f"{PLAN[1]}x{PLAN[2]}",
        "scipy": HAVE_SCIPY,
        "threads": _blas_state["how"],
    }
