"""The ``cython`` backend: the raw kernels of kernels/README.md compiled from ``.pyx`` with OpenMP.

The extensions are optional. When they are missing (no C compiler or no Cython at install time) or cannot be
loaded, this package still imports: ``UNAVAILABLE_REASON`` says why, and every kernel raises RuntimeError with
that reason. ``UNAVAILABLE_REASON is None`` means the backend works.

Threads: ``set_num_threads(n)`` sets the threads of every parallel loop of this backend; the default is OpenMP's
(``OMP_NUM_THREADS``, else all cores).

Builds: each extension (``_attention``, ``_embedding``, ``_blocks``) also exists as ``<name>_avx2`` and
``<name>_avx512`` on x86-64 (see setup.py); ``configure(isa=...)`` loads the widest one this CPU runs up to the cap
(``FASTATTN_CYTHON_ISA``, read by fastattn's settings module), ``isa()`` says which.

Tile products: the attention kernels multiply their tiles (Q·Kᵀ, P·V) with a register-blocked micro-kernel in C
(``_tile_gemm.h``, the default), with SciPy's BLAS, or with plain loops (the readable reference):
``configure(tiles=...)`` (``FASTATTN_TILES=micro|blas|loops``); ``tile_products()`` says which and how.
BLAS is loaded on the first large call and runs one thread per kernel thread (``blas_status()`` says how,
``configure(blas=False)`` turns it off); loading it sets SciPy's OpenBLAS to one thread for the whole process, for
good (see ``_blas.py``): ``scipy.linalg`` then runs single-threaded too, as after the Numba backend's first BLAS use.

The kernels exported here are the pipeline rows of ``fastattn._optable.OPS``, bound from whichever extension
defines each; the block kernels are in ``blocks.py``. Nothing here reads the environment: the registry
(``fastattn._backends``) calls ``configure`` with the settings' values before handing this module out.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import operator
import os

from ..._optable import PIPELINE, of_families
from . import _blas

_EXTENSIONS = ("_attention", "_embedding")  # the pipeline's extensions (blocks.py loads _blocks)
_ISA_ORDER = ("avx512", "avx2")  # widest first

UNAVAILABLE_REASON: str | None = None
_isa = "baseline"
_isa_cap = _ISA_ORDER[0]

_loaded: dict = {}  # extension name -> the build in use, which set_num_threads reaches
_threads: int | None = None  # the process-wide count fastattn._threads set last (None: OpenMP's default)


def _widest_build(name: str):
    """The build of extension `name` to use: the widest that this CPU runs, up to the ISA cap of ``configure``;
    it runs on the thread count set last. Returns (module, isa)."""
    base = importlib.import_module(f"{__name__}.{name}")
    module, isa = base, "baseline"
    allowed = _ISA_ORDER[_ISA_ORDER.index(_isa_cap) :] if _isa_cap in _ISA_ORDER else ()
    for wanted in allowed:
        if base.cpu_supports(wanted):
            try:
                module, isa = importlib.import_module(f"{__name__}.{name}_{wanted}"), wanted
                break
            except ImportError:  # that variant was not built here
                continue
    if _threads is not None:
        module._set_num_threads(_threads)
    _loaded[name] = module
    globals()[name] = module  # `from fastattn.kernels.cython import _attention` gives the build in use
    return module, isa


def _bind() -> None:
    """Load the builds and bind every pipeline kernel of the table from the extension that defines it."""
    global _isa
    builds = {}
    for name in _EXTENSIONS:
        builds[name], isa = _widest_build(name)
        if name == "_attention":
            _isa = isa
    for op in of_families(PIPELINE):
        owner = next((m for m in builds.values() if hasattr(m, op.name)), None)
        if owner is not None:
            globals()[op.name] = getattr(owner, op.name)
    for name in ("blas_status", "tile_products", "phase_profile"):
        globals()[name] = getattr(builds["_attention"], name)


try:
    _bind()
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

    for _name in [op.name for op in of_families(PIPELINE)] + ["blas_status", "tile_products", "phase_profile"]:
        globals()[_name] = _unavailable(_name)
    del _name


def configure(
    *,
    isa: str = "avx512",
    tiles: str = "micro",
    blas: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    plans: dict | None = None,
) -> None:
    """Values of fastattn's settings and plan: the widest ISA build allowed, the tile products and their tile shape
    (query rows x keys; None: the extension's built-in shape for those tile products), whether BLAS may load.

    ``plans`` (per dtype and head width) is accepted for the registry's sake and not used: the extension holds one
    tile shape per tile products for the whole process (``_attention._set_tiles``).
    Raises ValueError for a value this backend cannot take (the registry names the setting in its message).
    """
    global _isa_cap
    if UNAVAILABLE_REASON is not None:
        return
    if isa not in ("baseline",) + _ISA_ORDER:
        raise ValueError(f"isa must be one of baseline, {', '.join(_ISA_ORDER)}, got {isa!r}")
    if (block_q is None) != (block_k is None):
        raise ValueError(f"block_q and block_k go together, got {block_q!r} and {block_k!r}")
    _blas.ALLOWED = bool(blas)
    if isa != _isa_cap:
        _isa_cap = isa
        _bind()
        if "_blocks" in _loaded:  # blocks.py loaded already: it follows the new cap
            from . import blocks

            blocks._rebind()
    attention = _loaded["_attention"]
    attention._set_tile_products(tiles)
    if block_q is not None:
        attention._set_tiles(tiles, operator.index(block_q), operator.index(block_k))


def build(name: str = "_attention"):
    """The build in use of extension ``name`` (``_attention_avx512``, say): the module whose settings (``_set_tiles``,
    ``_set_tile_products``) the kernels of this backend read. The plain ``_attention`` is the baseline build."""
    return _loaded[name]


def isa() -> str:
    """The instruction set of the attention build in use: "avx512", "avx2" or "baseline" (none when unbuilt)."""
    return _isa if UNAVAILABLE_REASON is None else "none"


def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP (False: serial kernels, or not built at all)."""
    return UNAVAILABLE_REASON is None and _loaded["_attention"].openmp_enabled()


def get_num_threads() -> int:
    """Threads the parallel loops of this backend use (1 without OpenMP)."""
    if UNAVAILABLE_REASON is not None:
        return 1
    return _loaded["_attention"].get_num_threads()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every kernel of this backend from now on (no effect without OpenMP)."""
    global _threads
    count = _count("set_num_threads", n)
    _threads = count
    for module in _loaded.values():
        module._set_num_threads(count)


def set_local_threads(n: int | None):
    """Run the kernels launched from the calling thread only on ``n`` threads (None: back to the process-wide
    count). Other Python threads are not affected. Returns the previous override (None if there was none)."""
    count = 0 if n is None else _count("set_local_threads", n)
    previous = 0
    for module in _loaded.values():  # all extensions share the override
        previous = module._set_local_threads(count)
    return previous or None


def _count(where: str, n) -> int:
    try:
        count = operator.index(n)
    except TypeError:
        count = 0
    if isinstance(n, bool) or count < 1:
        raise ValueError(f"{where} needs an int >= 1, got: {n!r}")
    return count
