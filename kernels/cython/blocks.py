"""The Cython backend's block kernels (``_blocks.pyx``): the same names and signatures as ``fastattn._numpy_blocks``.

A thin module over the compiled extension, in the widest instruction set this CPU runs (``ISA``: "avx512", "avx2"
or "baseline"; setup.py builds the variants and ``fastattn.kernels.cython`` picks among them, as for attention).
When ``_blocks`` was not built (no C compiler or Cython at install time) or does not load, importing this module
raises ``ImportError`` saying why, and the registry reports that the ``cython`` backend has no block kernels.
"""

from __future__ import annotations

import numpy as np

from ..._optable import of_families
from . import _widest_build


def _rebind() -> None:
    """Bind every block kernel of the table from the build in use (again after the package's ISA cap changed)."""
    global _blocks, ISA
    _blocks, ISA = _widest_build("_blocks")  # _blocks_avx512, _blocks_avx2 or _blocks (the package's ISA cap)
    for op in of_families(("blocks",)):
        if hasattr(_blocks, op.name):  # one it lacks is reported by the registry's completeness check
            globals()[op.name] = getattr(_blocks, op.name)


try:
    _rebind()
except ImportError as exc:  # not built, or built for another Python: say so once, clearly
    raise ImportError(
        f"the Cython block kernels (fastattn.kernels.cython._blocks) are not available: {exc}; "
        "reinstall fastattn with Cython and a C compiler to build them"
    ) from exc
openmp_enabled = _blocks.openmp_enabled

__all__ = [op.name for op in of_families(("blocks",))] + [
    "get_num_threads",
    "set_num_threads",
    "set_local_threads",
    "openmp_enabled",
    "ISA",
]


def get_num_threads() -> int:
    """Threads the parallel loops of the block kernels use (1 without OpenMP)."""
    return _blocks.get_num_threads() if openmp_enabled() else 1


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every kernel of the Cython backend from now on (no effect without OpenMP)."""
    from . import set_num_threads as set_all

    set_all(n)


def set_local_threads(n: int | None):
    """The calling thread's override, shared with the attention kernels (see the package's ``set_local_threads``)."""
    from . import set_local_threads as set_local

    return set_local(n)


_gemm: dict = {"capsules": None, "set_threads": None, "get_threads": None, "given": set()}


def _gemm_ready() -> bool:
    """SciPy's sgemm/dgemm handed to the ``_blocks`` build in use, and its OpenBLAS on one thread (the OpenMP loop
    runs the calls side by side); False without SciPy, with ``FASTATTN_CYTHON_BLAS=off`` (see ``_blas``) or with a
    BLAS whose thread count cannot be set (it would oversubscribe the cores)."""
    if _gemm["capsules"] is None:
        import ctypes

        from . import _blas

        _gemm["capsules"] = False
        if _blas.disabled_reason() is None:
            try:
                capsules = _blas.gemm_capsules()
            except (ImportError, KeyError, AttributeError):
                capsules = None
            api = _blas.openblas_thread_api() if capsules is not None else None
            if api is not None:
                _gemm["set_threads"] = ctypes.CFUNCTYPE(None, ctypes.c_int)(api[0])
                _gemm["get_threads"] = ctypes.CFUNCTYPE(ctypes.c_int)(api[1])
                _gemm["capsules"] = capsules
    if not _gemm["capsules"]:
        return False
    if _blocks.__name__ not in _gemm["given"]:
        _blocks._set_gemm(*_gemm["capsules"])
        _gemm["given"].add(_blocks.__name__)
    if _gemm["get_threads"]() != 1:  # something raised it since: one again
        _gemm["set_threads"](1)
    return True


def text_matmul(out, x, w, lengths):
    """The per-sequence matmul (contract: ``fastattn._numpy_blocks``): one single-threaded SciPy BLAS call per
    sequence, in parallel. Without SciPy's BLAS a loop of NumPy matmuls (on NumPy's BLAS threads, whose count then
    shows in the bits)."""
    if x.shape[2] == 0 or w.shape[1] == 0:
        for b in range(x.shape[0]):
            out[b, : lengths[b]] = 0
        return
    if _gemm_ready():
        _blocks._text_matmul_blas(out, x, w, lengths)
        return
    for b in range(x.shape[0]):
        np.matmul(x[b, : lengths[b]], w, out=out[b, : lengths[b]])


def linear_backward(grad_x, grad_w, grad_out, x, w):
    """y = x @ w: grad_x = grad_out @ wᵀ, grad_w = xᵀ @ grad_out (BLAS, through NumPy)."""
    np.matmul(grad_out, w.T, out=grad_x)
    np.matmul(x.T, grad_out, out=grad_w)
