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


@needs_build
def test_cython_thread_count_reaches_every_extension_whenever_loaded():
    """set_num_threads reaches the extensions in use, also one loaded afterwards (the block kernels load on first
    use), and leaves alone the builds that are not in use."""
    code = (
        "from fastattn.kernels import cython\n"
        "cython.set_num_threads(1)\n"
        "from fastattn.kernels.cython import blocks\n"
        "print(cython._attention.get_num_threads(), cython._embedding.get_num_threads(), "
        "blocks._blocks.get_num_threads(), len(cython._loaded))\n"
        "cython.set_num_threads(2)\n"
        "print(cython._attention.get_num_threads(), blocks._blocks.get_num_threads())"
    )
    first, second = run_python(code).splitlines()
    assert first == "1 1 1 3"
    assert second == "2 2"


@pytest.mark.parametrize(
    "variable,backend",
    [
        ("FASTATTN_TILES", "numba"),
        pytest.param("FASTATTN_TILES", "cython", marks=needs_build),
        pytest.param("FASTATTN_CYTHON_ISA", "cython", marks=needs_build),
        pytest.param("FASTATTN_CYTHON_BLAS", "cython", marks=needs_build),
    ],
)
def test_a_bad_setting_makes_the_backend_unavailable_with_the_reason(variable, backend):
    """A typo in a backend's setting is neither ignored nor a crash, the same way for every setting: asking for that
    backend raises a ValueError naming the variable, backend_status() says it, the automatic choice moves on."""
    code = (
        "import numpy as np, fastattn\n"
        "q = np.ones((2, 3), np.float32)\n"
        "try:\n"
        f"    fastattn.scaled_dot_product_attention(q, q, q, backend={backend!r})\n"
        "except ValueError as exc:\n"
        "    print('raised', exc)\n"
        "print(fastattn.scaled_dot_product_attention(q, q, q).shape)\n"
        f"print(fastattn.backend_status()[{backend!r}])"
    )
    env = dict(os.environ, **{variable: "bogus"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    raised, shape, status = out.stdout.strip().splitlines()
    assert raised.startswith(f"raised backend {backend!r}") and variable in raised and "'bogus'" in raised
    assert shape == "(2, 3)"
    assert variable in status


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


def test_first_numba_calls_do_not_import_scipy_linalg():
    """Numba's registries import scipy.linalg (a third of the first call's time) to probe for a BLAS that the default
    kernels never call; the backend loads them without it (kernels/numba/_config.py: load_registries)."""
    pytest.importorskip("scipy")
    code = (
        "import sys, numpy as np, fastattn\n"
        "q = np.ones((1, 2, 40, 16), np.float32)\n"
        "mask = np.zeros((40, 40), np.float32)\n"
        "fastattn.scaled_dot_product_attention(q, q, q, backend='numba')\n"
        "fastattn.scaled_dot_product_attention(q, q, q, is_causal=True, backend='numba')\n"
        "fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask, backend='numba')\n"
        "fastattn.embed([1, 2], np.eye(4, dtype=np.float32), backend='numba')\n"
        "linalg = sorted(m for m in sys.modules if m.startswith('scipy.linalg'))\n"
        "print(fastattn.kernels.numba.blas_info()['tiles'], linalg)"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_TILES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "micro []"


@pytest.mark.skipif(
    os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"), reason="NUMBA_DISABLE_JIT: Numba loads no registries"
)
def test_numba_still_finds_blas_after_loading_without_scipy_linalg():
    """What load_registries keeps out is only deferred: np.dot in a new @njit function imports SciPy's BLAS and
    computes, and np.convolve's BLAS probe says what Numba's own would have."""
    pytest.importorskip("scipy")
    code = (
        "import sys, numpy as np, numba\n"
        "from fastattn.kernels import numba as kn\n"
        "print('scipy.linalg' in sys.modules, numba.np.arraymath._HAVE_BLAS)\n"
        "dot = numba.njit(lambda a, b: np.dot(a, b))\n"
        "a = np.arange(12.0).reshape(3, 4)\n"
        "print(np.array_equal(dot(a, a.T), a @ a.T), 'scipy.linalg' in sys.modules)"
    )
    assert run_python(code).splitlines() == ["False True", "True True"]


def test_scipy_linalg_is_refused_only_in_the_thread_that_loads_the_registries():
    """The finder that keeps scipy.linalg out while the registries load refuses it in its own thread only: another
    thread importing scipy.linalg meanwhile gets it."""
    pytest.importorskip("scipy")
    code = (
        "import sys, threading\n"
        "from fastattn.kernels.numba import _config\n"
        "refuse = _config._RefuseScipyLinalg(threading.get_ident())\n"
        "sys.meta_path.insert(0, refuse)\n"
        "try:\n"
        "    import scipy.linalg\n"
        "except ImportError as exc:\n"
        "    print('refused here:', 'scipy.linalg' in str(exc))\n"
        "seen = []\n"
        "def other():\n"
        "    import scipy.linalg\n"
        "    seen.append(scipy.linalg.__name__)\n"
        "t = threading.Thread(target=other)\n"
        "t.start(); t.join()\n"
        "print('other thread:', seen)"
    )
    assert run_python(code).splitlines() == ["refused here: True", "other thread: ['scipy.linalg']"]


@pytest.mark.parametrize(
    "backend,hide_threadpoolctl",
    [("numba", False), ("numba", True), pytest.param("cython", False, marks=needs_build)],
    ids=["numba", "numba-ctypes", "cython"],
)
def test_blas_tiles_leave_numpys_blas_threads_alone(backend, hide_threadpoolctl):
    """The "blas" tile products set SciPy's BLAS to one thread for the process, and only SciPy's: NumPy's own BLAS
    (a library of its own in NumPy >= 2 wheels) keeps its thread count. In a subprocess: the count stays changed."""
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    code = (
        "import sys, numpy as np, threadpoolctl\n"
        "def blas():\n"
        "    return {m.filepath: m for m in threadpoolctl.ThreadpoolController().lib_controllers "
        "if m.user_api == 'blas'}\n"
        "numpys = set(blas())  # loaded with NumPy, before SciPy\n"
        "import scipy.linalg\n"
        "scipys = set(blas()) - numpys\n"
        "if not numpys or not scipys:\n"
        "    print('shared'); sys.exit()\n"
        "for path in numpys:\n"
        "    blas()[path].set_num_threads(2)\n"
        f"if {hide_threadpoolctl}:\n"
        "    del sys.modules['threadpoolctl']\n"
        "    sys.modules['threadpoolctl'] = None  # the backend falls back to OpenBLAS's own entry point\n"
        "import fastattn\n"
        "q = np.random.default_rng(0).standard_normal((1, 12, 512, 64)).astype(np.float32)\n"
        f"out = fastattn.scaled_dot_product_attention(q, q, q, backend={backend!r})\n"
        "ref = fastattn.scaled_dot_product_attention(q, q, q, backend='numpy')\n"
        "assert np.abs(out - ref).max() < 1e-4\n"
        "del sys.modules['threadpoolctl']\n"
        "import threadpoolctl\n"
        "now = blas()\n"
        "print(sorted({now[p].num_threads for p in numpys}), sorted({now[p].num_threads for p in scipys}))\n"
    )
    env = dict(os.environ, FASTATTN_TILES="blas")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    if out.stdout.strip() == "shared":
        pytest.skip("NumPy and SciPy share one BLAS library here")
    assert out.stdout.strip() == "[2] [1]"


# ------------------------------------------------------------------------------------------------ the micro-kernel
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_isa_flags() -> dict:
    """setup.py's ISA_FLAGS (read from its source: importing setup.py would run the build)."""
    import ast

    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ISA_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no ISA_FLAGS")


def _c_compiler():
    import shutil
    import sysconfig

    for cc in ((sysconfig.get_config_var("CC") or "").split()[:1] or []) + ["cc", "gcc", "clang"]:
        if shutil.which(cc):
            return cc
    return None


@pytest.mark.parametrize("build", ["plain", "baseline", "avx2", "avx512"])
def test_tile_gemm_micro_kernel_in_c(build, tmp_path):
    """kernels/cython/_tile_gemm.h on its own (tests/c/test_tile_gemm.c): every ragged edge, strided operands, both
    types, against a double reference; compiled as each build compiles it, and with the plain-loop fallback."""
    import platform

    cc = _c_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = {"plain": ["-DFA_TILE_GEMM_PLAIN"], "baseline": []}.get(build)
    if flags is None:
        from fastattn.kernels import cython

        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("ISA builds exist on x86-64 only")
        if cython.UNAVAILABLE_REASON is not None or not cython._attention.cpu_supports(build):
            pytest.skip(f"this CPU does not run the {build} build (or the Cython backend is not built)")
        flags = _setup_isa_flags()[build]
    exe = tmp_path / "test_tile_gemm"
    src = os.path.join(ROOT, "tests", "c", "test_tile_gemm.c")
    include = os.path.join(ROOT, "kernels", "cython")
    cmd = [cc, "-O3", "-ffp-contract=fast", *flags, f"-I{include}", src, "-o", str(exe), "-lm"]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr
    assert ("vectors=0" in out.stdout) == (build == "plain")
