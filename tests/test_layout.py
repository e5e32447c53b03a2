"""The house rules: one table of operations that every backend fulfils, one settings module, tools in their own
subpackage, and an editable checkout that works from its parent folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import warnings

import pytest

import fastattn
from fastattn import _backends, _optable, _settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(fastattn.__file__))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


# ---- one table of operations -----------------------------------------------------------------------------------
STATUS = _backends.backend_status()
ALL_BACKENDS = [
    pytest.param(n, marks=pytest.mark.skipif(STATUS[n] is not None, reason=f"{n} is not available: {STATUS[n]}"))
    for n in _backends.NAMES
]
needs_cython = pytest.mark.skipif(STATUS["cython"] is not None, reason=f"cython: {STATUS['cython']}")


@pytest.mark.parametrize("family", _optable.FAMILIES)
@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_every_backend_implements_every_operation_of_every_family(name, family):
    module = _backends.MODULES[name]("blocks" if family == "blocks" else "pipeline")
    assert _backends.missing_kernels(module, family) == []
    for op_name, why in getattr(module, "UNSUPPORTED", {}).items():  # an operation left out says why
        assert isinstance(why, str) and why.strip(), op_name


def test_a_module_that_lacks_an_operation_is_reported():
    import types

    partial = types.SimpleNamespace(**{op.name: print for op in _optable.of_families(("blocks",))})
    del partial.merge_heads
    assert _backends.missing_kernels(partial, "blocks") == ["merge_heads"]
    partial.UNSUPPORTED = {"merge_heads": "not needed here"}
    assert _backends.missing_kernels(partial, "blocks") == []


def test_the_kernel_contract_lists_every_operation():
    contract = _read("kernels", "README.md")
    missing = [op.name for op in _optable.OPS if f"`{op.name}`" not in contract]
    assert missing == []


@needs_cython
def test_the_cython_exports_come_from_the_table():
    from fastattn.kernels import cython
    from fastattn.kernels.cython import blocks

    for op in _optable.of_families(_optable.PIPELINE):
        assert callable(getattr(cython, op.name)), op.name
    tools = {"get_num_threads", "set_num_threads", "set_local_threads", "openmp_enabled", "ISA"}
    assert sorted(op.name for op in _optable.of_families(("blocks",))) == sorted(set(blocks.__all__) - tools)


# ---- one settings module -----------------------------------------------------------------------------------------
def test_only_the_settings_module_reads_fastattn_variables():
    """Kernels receive values; nothing but fastattn/_settings.py (and setup.py through it) reads FASTATTN_*."""
    offenders = []
    pattern = re.compile(r"environ[^\n]{0,40}FASTATTN_|getenv\([^\n]{0,10}FASTATTN_")
    for folder in (PACKAGE, os.path.join(ROOT, "kernels")):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name.endswith((".py", ".pyx", ".pxi")) and name != "_settings.py":
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        if pattern.search(f.read()):
                            offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
    if os.path.exists(os.path.join(ROOT, "setup.py")):
        assert not pattern.search(_read("setup.py"))


def test_the_readme_settings_table_is_the_settings_module():
    if not os.path.exists(os.path.join(ROOT, "README.md")):
        pytest.skip("not a checkout")
    assert _settings.table_markdown() in _read("README.md")


@pytest.mark.parametrize("word,value", [("1", True), ("ON", True), (" yes ", True), ("0", False), ("off", False)])
def test_flags_are_parsed_one_way(word, value):
    assert _settings.get("FASTATTN_CYTHON_BLAS", environ={"FASTATTN_CYTHON_BLAS": word}) is value


def test_defaults_and_bad_values():
    assert _settings.get("FASTATTN_TILES", environ={}) == "micro"
    assert _settings.get("FASTATTN_BACKEND", environ={}) == ""
    with pytest.raises(ValueError, match=r"FASTATTN_TILES must be one of micro, blas, loops, got 'gemm'"):
        _settings.get("FASTATTN_TILES", environ={"FASTATTN_TILES": "gemm"})
    with pytest.raises(ValueError, match=r"FASTATTN_CYTHON_BLAS must be one of .*\(on/off\), got 'maybe'"):
        _settings.get("FASTATTN_CYTHON_BLAS", environ={"FASTATTN_CYTHON_BLAS": "maybe"})


def test_the_old_tile_variables_still_work_and_say_they_were_renamed():
    with pytest.warns(DeprecationWarning, match="FASTATTN_NUMBA_ENGINE is renamed FASTATTN_TILES"):
        assert _settings.get("FASTATTN_TILES", environ={"FASTATTN_NUMBA_ENGINE": "tiled"}) == "micro"
    with pytest.warns(DeprecationWarning, match="FASTATTN_CYTHON_TILES is renamed FASTATTN_TILES"):
        assert _settings.get("FASTATTN_TILES", environ={"FASTATTN_CYTHON_TILES": "loops"}) == "loops"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name wins, silently
        env = {"FASTATTN_TILES": "blas", "FASTATTN_CYTHON_TILES": "loops"}
        assert _settings.get("FASTATTN_TILES", environ=env) == "blas"


# ---- tools in their own subpackage -------------------------------------------------------------------------------
def test_no_module_of_the_package_shares_its_name_with_a_top_level_folder():
    """``bench/`` beside ``fastattn/bench.py`` made the demo fail from an editable checkout's parent folder."""
    if not os.path.exists(os.path.join(ROOT, "pyproject.toml")):
        pytest.skip("not a checkout")
    folders = {n for n in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, n)) and not n.startswith(".")}
    folders -= {"fastattn", "kernels", "build", "dist"}  # the package itself, and the kernels it maps in
    clashes = sorted(n for n in folders if os.path.exists(os.path.join(PACKAGE, n + ".py")))
    clashes += sorted(n for n in folders if os.path.isdir(os.path.join(PACKAGE, n)))
    assert clashes == []


def _copy_checkout(dest):
    """The checkout's tracked (and untracked, not ignored) files, as a fresh clone would have them."""
    import shutil

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


@pytest.mark.slow
def test_the_demo_runs_from_the_parent_folder_of_an_editable_checkout(tmp_path):
    """``git clone ... fastattn; pip install -e fastattn; python -m fastattn demo`` from the clone's parent folder."""
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    clone = tmp_path / "fastattn"
    _copy_checkout(str(clone))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    # The venv sees this interpreter's packages (numpy, numba, pip, setuptools) through a .pth file; not its
    # fastattn, whose editable finder lives in a .pth that a plain path entry does not run.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    ours = {p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)}
    ours |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "zz_parent_site.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTATTN_")}
    env["FASTATTN_BUILD_CYTHON"] = "0"  # the Cython build is tested elsewhere; this is about the layout
    install = subprocess.run(
        [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(clone)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env.pop("FASTATTN_BUILD_CYTHON")
    run = subprocess.run(
        [py, "-m", "fastattn", "demo"], cwd=str(tmp_path), capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "black" in run.stdout
    where = subprocess.run(
        [py, "-c", "import fastattn.tools.bench as b; print(b.__file__)"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env=env,
    )
    assert where.stdout.strip() == str(clone / "fastattn" / "tools" / "bench.py")
