"""Find the BLAS that SciPy exports to Cython, and the knob that keeps OpenBLAS to one thread.

The attention kernels multiply tiles with ``sgemm``/``dgemm`` when they are worth it. They take the routines
from ``scipy.linalg.cython_blas`` at run time (its ``__pyx_capi__`` capsules), so SciPy is needed neither to
build fastattn nor to run it: without SciPy the kernels use their own loops.

The gemm calls run inside an OpenMP parallel region, one tile per thread. A threaded OpenBLAS would start its own
threads on top of those (oversubscription), so **SciPy's OpenBLAS is set to one thread for the whole process**
when the kernels first load BLAS (the first call large enough to use it), and it stays so: the kernels never
put the previous count back. Before each kernel that calls BLAS they check the count (one cheap call) and set
it to one again if something raised it since. The Numba backend does the same (``kernels/numba/_config.py``,
``limit_scipy_blas_threads``).

The price: ``scipy.linalg`` in the same process runs on one thread from then on (NumPy's own BLAS is a separate
library and keeps its threads). Saving and restoring the count around each kernel call, as an earlier version
did, is no better: OpenBLAS has no per-thread setting that works in its pthreads builds
(``openblas_set_num_threads_local`` is process-wide there), so two Python threads running kernels at once race on
the process-wide count (one may restore "2" while the other still runs its gemms, or leave it at 1), and each
restore to several threads wakes OpenBLAS's thread pool, whose threads then spin and take cores from the kernels.
Only SciPy's own library is touched (``fastattn.kernels._scipy_blas``: the one in SciPy's folders, never one in
NumPy's), and only through the 32-bit-integer (LP64) names that SciPy's Cython BLAS calls: NumPy's own OpenBLAS
(ILP64, ``...64_`` names, in ``numpy.libs``) keeps its threads.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import importlib.util
import os
import sys

from .._scipy_blas import loaded_libraries, scipy_libraries

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads")
_GETTERS = ("openblas_get_num_threads", "scipy_openblas_get_num_threads")


#: Whether BLAS may be loaded at all: ``configure(blas=...)`` of the package sets it (``FASTATTN_CYTHON_BLAS``).
ALLOWED = True


def disabled_reason() -> str | None:
    """Why BLAS must not be used (turned off by ``FASTATTN_CYTHON_BLAS=off``), else None."""
    if not ALLOWED:
        return "FASTATTN_CYTHON_BLAS=off turned BLAS off"
    return None


def _cython_blas_module():
    """``scipy.linalg.cython_blas``, loaded without running ``scipy/linalg/__init__.py`` when that is not done yet.

    Importing ``scipy.linalg`` takes ~0.25 s (it imports much of SciPy); the extension module alone ~0.05 s.
    It is registered under its own name, so a later ``import scipy.linalg`` uses this very module. Should the
    shortcut fail (another SciPy layout), the ordinary import runs.
    """
    name = "scipy.linalg.cython_blas"
    if name in sys.modules or "scipy.linalg" in sys.modules:
        return importlib.import_module(name)
    try:
        import scipy

        folder = os.path.join(os.path.dirname(scipy.__file__), "linalg")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "cython_blas" + suffix)
            if os.path.exists(path):
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
                return module
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 - any surprise in the shortcut: take the ordinary road
        pass
    return importlib.import_module(name)


def gemm_capsules():
    """The ``sgemm`` and ``dgemm`` capsules of ``scipy.linalg.cython_blas`` (ImportError without SciPy)."""
    capi = _cython_blas_module().__pyx_capi__
    return capi["sgemm"], capi["dgemm"]


def openblas_thread_api() -> tuple[int, int, str] | None:
    """Addresses of ``(set_num_threads(int), get_num_threads())`` of the loaded LP64 OpenBLAS, and its path.

    None when no such library is loaded (SciPy on MKL, BLIS or Accelerate: not limited, see the module doc).
    """
    loaded = [p for p in loaded_libraries() if "openblas" in os.path.basename(p).lower()]
    for path in scipy_libraries(loaded):  # SciPy's own, never NumPy's (both may be named libscipy_openblas*)
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in zip(_SETTERS, _GETTERS, strict=True):
            setter = getattr(lib, set_name, None)
            getter = getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                as_address = ctypes.cast(setter, ctypes.c_void_p).value, ctypes.cast(getter, ctypes.c_void_p).value
                return as_address[0], as_address[1], path
    return None
