"""The build and the import: the Cython backend is present with OpenMP, imports stay cheap, first calls are fast.

Platforms without a C compiler or OpenMP set FASTATTN_ALLOW_NO_CYTHON=1 to turn the presence checks off; CI does not.
"""

import os
import subprocess
import sys

import pytest

import fastattn

needs_build = pytest.mark.skipif(
    os.environ.get("FASTATTN_ALLOW_NO_CYTHON") == "1", reason="FASTATTN_ALLOW_NO_CYTHON=1: no compiled backend expected"
)


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


@needs_build
def test_cython_backend_is_built_with_openmp():
    status = fastattn.backend_status()
    assert status["cython"] is None, status["cython"]
    from fastattn.kernels import cython

    assert cython.openmp_enabled(), "the Cython kernels were built without OpenMP"


def test_unavailable_cython_says_why():
    from fastattn.kernels import cython

    if cython.UNAVAILABLE_REASON is None:
        assert "cython" in fastattn.available_backends()
    else:
        assert "cython" not in fastattn.available_backends()
        assert fastattn.backend_status()["cython"] == cython.UNAVAILABLE_REASON


@needs_build
def test_import_and_first_cython_call_do_not_import_numba():
    code = (
        "import sys, numpy as np, fastattn\n"
        "q = np.ones((1, 2, 8, 16), np.float32)\n"
        "fastattn.scaled_dot_product_attention(q, q, q, backend='cython')\n"
        "fastattn.embed([1, 2], np.eye(4, dtype=np.float32), backend='cython')\n"
        "print('numba' in sys.modules)\n"
    )
    assert run_python(code) == "False"


@needs_build
def test_automatic_choice_without_numba_does_not_import_it():
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # as if numba were not installed\n"
        "import numpy as np, fastattn\n"
        "assert 'numba' not in fastattn.available_backends(), fastattn.available_backends()\n"
        "print(fastattn.available_backends()[0], fastattn.backend_status()['numba'] is not None)\n"
    )
    assert run_python(code) == "cython True"


def test_numba_kernels_compile_lazily():
    """Loading the Numba backend compiles nothing; the first call compiles (or loads from cache) what it needs."""
    code = (
        "import sys, numpy as np, fastattn\n"
        "from fastattn import _backends\n"
        "_backends.kernels('numba')\n"
        "from numba.core.registry import CPUDispatcher\n"
        "def compiled():\n"
        "    mods = [m for n, m in list(sys.modules.items()) if n.startswith('fastattn.kernels.numba')]\n"
        "    found = {id(f): f for m in mods for f in vars(m).values() if isinstance(f, CPUDispatcher)}\n"
        "    return len(found), sum(bool(f.signatures) for f in found.values())\n"
        "print(*compiled())\n"
        "fastattn.embed([1], np.eye(3, dtype=np.float32), backend='numba')\n"
        "print(*compiled())\n"
    )
    before, after = run_python(code).splitlines()
    kernels, done = map(int, before.split())
    assert kernels > 5 and done == 0
    assert int(after.split()[1]) >= 1
