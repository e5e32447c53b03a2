"""Which of the loaded BLAS libraries is SciPy's: the one both backends' "blas" tile products call, and the only one
they set to one thread (``kernels/numba/_config.py``: ``limit_scipy_blas_threads``; ``kernels/cython/_blas.py``).

NumPy >= 2 wheels ship their own OpenBLAS (``numpy.libs/libscipy_openblas64_*.so``, ``numpy/.dylibs``), SciPy's
wheels another (``scipy.libs/libscipy_openblas-*.so``, ``scipy/.dylibs``). Both lie in site-packages and both have
"scipy" in their file name, so neither "under site-packages" nor "named scipy" tells them apart: that would pin
NumPy's BLAS to one thread for the whole process as well. SciPy's own library is the one in SciPy's own folders (its
package folder, ``.dylibs`` included, the wheels' ``scipy.libs`` beside it, or the ``scipy_openblas32`` package that
builds from source link). Where SciPy has none there (conda, a Linux distribution: one shared BLAS), the candidates
are the loaded libraries outside NumPy's own folders; NumPy then uses that same library, and limiting it limits
NumPy too, which cannot be avoided without oversubscribing the cores. NumPy's own folders are never touched.

Nothing here imports SciPy or NumPy (``importlib.util.find_spec`` of a top-level name only finds its folder).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def _package_folders(package: str) -> list[str]:
    """``package``'s folder and the ``<package>.libs`` folder its wheels put beside it (empty if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not os.path.isabs(spec.origin):
        return []
    folder = os.path.dirname(os.path.realpath(spec.origin))
    return [folder, os.path.join(os.path.dirname(folder), package + ".libs")]


def scipy_folders() -> list[str]:
    """The folders whose libraries are SciPy's own."""
    return _package_folders("scipy") + _package_folders("scipy_openblas32")[:1]


def numpy_folders() -> list[str]:
    """The folders whose libraries are NumPy's own."""
    return _package_folders("numpy")


def _normal(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def inside(path: str, folders) -> bool:
    """Whether the file ``path`` lies in one of ``folders`` (or below), links resolved."""
    p = _normal(path)
    return any(p.startswith(_normal(f) + os.sep) for f in folders)


def scipy_libraries(paths) -> list[str]:
    """Those of ``paths`` (loaded libraries) that may be SciPy's BLAS, in their order: the ones in SciPy's own
    folders; if there are none, the ones outside NumPy's own folders (a shared BLAS). Never one of NumPy's."""
    paths = list(paths)
    own = [p for p in paths if inside(p, scipy_folders())]
    if own:
        return own
    mine = numpy_folders()
    return [p for p in paths if not inside(p, mine)]


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries this process has loaded (Linux: ``/proc/self/maps``); elsewhere the libraries
    of SciPy's own folders, which are what the callers look for there."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
            return sorted(p for p in paths if p.startswith("/"))
        except OSError:
            pass
    found = []
    for folder in scipy_folders():
        for pattern in ("*", os.path.join(".dylibs", "*"), os.path.join("lib", "*")):
            found += glob.glob(os.path.join(folder, pattern))
    return sorted(p for p in found if p.lower().endswith((".so", ".dylib", ".dll")) or ".so." in p)
