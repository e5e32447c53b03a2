"""The ``cython`` backend: the raw kernels of kernels/README.md compiled from ``.pyx`` with OpenMP.

The extensions are optional. When they are missing (no C compiler or no Cython at install time) or cannot be
loaded, this package still imports: ``UNAVAILABLE_REASON`` says why, and every kernel raises RuntimeError with
that reason. ``UNAVAILABLE_REASON is None`` means the backend works.

Threads: ``set_num_threads(n)`` sets the threads of every parallel loop of this backend; the default is OpenMP's
(``OMP_NUM_THREADS``, else all cores).

Builds: each extension (``_attention``, ``_embedding``, ``_blocks``) also exists as ``<name>_avx2`` and
``<name>_avx512`` on x86-64 (see setup.py); the widest one this CPU runs is used, ``isa()`` says which.
``FASTATTN_CYTHON_ISA=baseline|avx2|avx512`` caps the choice (for tests and comparisons).

Tile products: the attention kernels multiply their tiles (Q·Kᵀ, P·V) with a register-blocked micro-kernel in C
(``_tile_gemm.h``, the default), with SciPy's BLAS, or with plain loops (the readable reference).
``FASTATTN_CYTHON_TILES=micro|blas|loops`` picks one at import; ``tile_products()`` says which and how.
BLAS is loaded on the first large call and runs one thread per kernel thread (``blas_status()`` says how,
``FASTATTN_CYTHON_BLAS=0`` turns it off); loading it sets SciPy's OpenBLAS to one thread for the whole process, for
good (see ``_blas.py``): ``scipy.linalg`` then runs single-threaded too, as after the Numba backend's first BLAS use.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import operator
import os

KERNELS = (
    "gather",
    "gather_add_positions",
    "add_positions",
    "rope",
    "scores",
    "softmax",
    "weighted_sum",
    "attention",
    "attention_backward",
    "softmax_backward",
    "scores_backward",
    "weighted_sum_backward",
    "gather_backward",
    "add_positions_backward",
)
_EXTENSIONS = ("_attention", "_embedding")
_ISA_ORDER = ("avx512", "avx2")  # widest first

UNAVAILABLE_REASON: str | None = None
_isa = "baseline"


_loaded: list = []  # the extension modules in use (one build of each), which set_num_threads reaches
_threads: int | None = None  # the count set_num_threads set last (None: OpenMP's default)


def _widest_build(name: str):
    """The module `name`, or its widest ISA build that this CPU runs and FASTATTN_CYTHON_ISA allows; it runs on the
    thread count set_num_threads set last."""
    base = importlib.import_module(f"{__name__}.{name}")
    module, isa = base, "baseline"
    cap = os.environ.get("FASTATTN_CYTHON_ISA", "").strip().lower() or _ISA_ORDER[0]
    allowed = _ISA_ORDER[_ISA_ORDER.index(cap) :] if cap in _ISA_ORDER else ()
    for wanted in allowed:
        if base.cpu_supports(wanted):
            try:
                module, isa = importlib.import_module(f"{__name__}.{name}_{wanted}"), wanted
                break
            except ImportError:  # that variant was not built here
                continue
    if _threads is not None:
        module._set_num_threads(_threads)
    _loaded.append(module)
    return module, isa


try:
    _attention, _isa = _widest_build("_attention")
    _embedding, _ = _widest_build("_embedding")
except ImportError as _exc:
    _here = os.path.dirname(os.path.abspath(__file__))
    _built = [
        name
        for name in _EXTENSIONS
        if any(glob.glob(os.path.join(_here, name + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    ]
    if len(_built) < len(_EXTENSIONS):
        UNAVAILABLE_REASON = (
            "the Cython extensions were not built (no C compiler or no Cython at install time): "
            "reinstall fastattn with a C compiler to enable them"
        )
    else:
        UNAVAILABLE_REASON = f"the Cython extensions are built but do not load ({_exc})"
    del _here, _built

    def _unavailable(name):
        def kernel(*args, **kwargs):
            raise RuntimeError(f"fastattn.kernels.cython.{name} cannot run: {UNAVAILABLE_REASON}")

        kernel.__name__ = kernel.__qualname__ = name
        return kernel

    for _name in KERNELS + ("blas_status", "tile_products"):
        globals()[_name] = _unavailable(_name)
    del _name
    _attention = _embedding = None
else:
    attention = _attention.attention
    attention_backward = _attention.attention_backward
    softmax_backward = _attention.softmax_backward
    scores_backward = _attention.scores_backward
    weighted_sum_backward = _attention.weighted_sum_backward
    scores = _attention.scores
    softmax = _attention.softmax
    weighted_sum = _attention.weighted_sum
    blas_status = _attention.blas_status
    tile_products = _attention.tile_products
    _tiles = os.environ.get("FASTATTN_CYTHON_TILES", "").strip().lower()
    if _tiles:
        try:
            _attention._set_tile_products(_tiles)
        except ValueError as _exc:
            raise ValueError(f"FASTATTN_CYTHON_TILES: {_exc}") from None
    del _tiles
    gather = _embedding.gather
    gather_add_positions = _embedding.gather_add_positions
    add_positions = _embedding.add_positions
    rope = _embedding.rope
    gather_backward = _embedding.gather_backward
    add_positions_backward = _embedding.add_positions_backward


def isa() -> str:
    """The instruction set of the attention build in use: "avx512", "avx2" or "baseline" (none when unbuilt)."""
    return _isa if UNAVAILABLE_REASON is None else "none"


def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP (False: serial kernels, or not built at all)."""
    return UNAVAILABLE_REASON is None and _attention.openmp_enabled()


def get_num_threads() -> int:
    """Threads the parallel loops of this backend use (1 without OpenMP)."""
    if UNAVAILABLE_REASON is not None:
        return 1
    return _attention.get_num_threads()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every kernel of this backend from now on (no effect without OpenMP)."""
    global _threads
    try:
        count = operator.index(n)
    except TypeError:
        count = 0
    if isinstance(n, bool) or count < 1:
        raise ValueError(f"set_num_threads needs an int >= 1, got: {n!r}")
    _threads = count
    for module in _loaded:  # a call per extension: cheap enough to run around every small call (models' decoding)
        module._set_num_threads(count)
