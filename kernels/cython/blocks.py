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


def linear_backward(grad_x, grad_w, grad_out, x, w):
    """y = x @ w: grad_x = grad_out @ wᵀ, grad_w = xᵀ @ grad_out (BLAS, through NumPy)."""
    np.matmul(grad_out, w.T, out=grad_x)
    np.matmul(x.T, grad_out, out=grad_w)
