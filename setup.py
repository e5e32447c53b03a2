"""Build script: only the optional Cython extensions live here (metadata is in pyproject.toml).

Every ``kernels/cython/*.pyx`` becomes the extension ``fastattn.kernels.cython.<name>``.

* OpenMP is probed with a test program (as scikit-learn does): with it the kernels run in parallel
  (``-fopenmp``), without it they are built serial and a warning says so. ``FASTATTN_FAIL_NO_OPENMP=1`` makes a
  missing OpenMP an error instead.
* Flags: ``-O3`` and flags that do not change results (no ``-ffast-math``). The code is built for the baseline
  of the platform (no ``-march=native``): the wheel runs on any x86-64. ``FASTATTN_NATIVE=1`` adds
  ``-march=native`` for a build that only this machine will run.
* ISA variants: a ``.pyx`` with the line ``# fastattn: isa-variants`` is also built, on x86-64 with gcc or
  clang, as ``<name>_avx2`` (``-mavx2 -mfma``) and ``<name>_avx512`` (AVX-512 F/DQ/BW/VL); at import the package
  takes the widest one the CPU runs (numpy dispatches the same way, per function). The baseline build is always
  there. A variant the compiler cannot build is left out with a warning. ``FASTATTN_ISA_VARIANTS=0`` skips them.
* The extensions are optional: without Cython or without a working C compiler the build warns and goes on, and
  fastattn installs without them (``fastattn.kernels.cython.UNAVAILABLE_REASON`` then says why).
  ``FASTATTN_REQUIRE_CYTHON=1`` turns such a failure into an error (for CI and packagers).
"""

import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "fastattn.kernels.cython"
PYX_DIR = os.path.join("kernels", "cython")


def _load_settings():
    """fastattn/_settings.py by path (the package itself cannot be imported before it is built)."""
    spec = importlib.util.spec_from_file_location("_fastattn_settings", os.path.join(HERE, "fastattn", "_settings.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


_settings = _load_settings()


def _env_flag(name):
    """A build switch of fastattn/_settings.py (on/off), parsed as the library parses its own."""
    return _settings.get(name)


def _warn(message):
    warnings.warn(message, stacklevel=2)
    print(f"WARNING (fastattn build): {message}", file=sys.stderr)


HEADERS = sorted(os.path.relpath(h, HERE) for h in glob.glob(os.path.join(HERE, PYX_DIR, "*.h")))  # C included
ISA_MARKER = "# fastattn: isa-variants"
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
}


def _wants_isa_variants(path):
    with open(path, encoding="utf-8") as f:
        return any(line.strip() == ISA_MARKER for line in f)


def _extensions():
    if not _env_flag("FASTATTN_BUILD_CYTHON"):
        return []
    isa_ok = platform.machine().lower() in ("x86_64", "amd64") and _env_flag("FASTATTN_ISA_VARIANTS")
    extensions = []
    for src in sorted(glob.glob(os.path.join(HERE, PYX_DIR, "*.pyx"))):
        name = os.path.splitext(os.path.basename(src))[0]
        rel = os.path.relpath(src, HERE)
        base = Extension(f"{PACKAGE}.{name}", [rel], include_dirs=[PYX_DIR], depends=HEADERS)
        base.fastattn_isa = None
        extensions.append(base)
        if isa_ok and _wants_isa_variants(src):
            for isa in ISA_FLAGS:
                variant = Extension(f"{PACKAGE}.{name}_{isa}", [rel], include_dirs=[PYX_DIR], depends=HEADERS)
                variant.fastattn_isa = isa
                extensions.append(variant)
    return extensions


PLAIN_TEST = "int main(void) { return 0; }\n"
OPENMP_TEST = textwrap.dedent(
    """\
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+: n)
        n += 1;
        printf("%d\\n", n == omp_get_max_threads());
        return 0;
    }
    """
)


class _NoOpenMP(RuntimeError):
    pass


class _NoCompiler(RuntimeError):
    pass


class OptionalBuildExt(build_ext):
    """Cythonize, probe OpenMP, compile with safe flags; warn and go on when the extensions cannot be built."""

    def run(self):
        if not self.extensions:
            return
        try:
            from Cython.Build import cythonize
        except ImportError:
            self._give_up("Cython is not installed at build time")
            return
        # One C file per (module, ISA): each group is translated into its own folder under build_temp.
        for isa in {getattr(ext, "fastattn_isa", None) for ext in self.extensions}:
            group = [ext for ext in self.extensions if getattr(ext, "fastattn_isa", None) == isa]
            build_dir = os.path.join(self.build_temp, "cython", isa or "baseline")
            try:
                translated = cythonize(group, language_level=3, quiet=True, build_dir=build_dir)
            except Exception as exc:  # noqa: BLE001 - e.g. an sdist that lacks an included .pxi
                self._give_up(f"Cython could not translate the .pyx files ({type(exc).__name__}: {exc})")
                return
            for ext, c_ext in zip(group, translated, strict=True):
                ext.sources = c_ext.sources  # keep setuptools' own Extension objects, now with .c sources
        try:
            super().run()
        except _NoOpenMP:
            raise
        except _NoCompiler as exc:
            self._give_up(str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken compiler, missing headers: all optional
            self._give_up(f"compiling them failed ({type(exc).__name__}: {exc})")

    def _give_up(self, why):
        if _env_flag("FASTATTN_REQUIRE_CYTHON"):
            raise RuntimeError(f"the fastattn Cython extensions could not be built: {why}")
        _warn(
            f"the optional Cython kernels of fastattn are not built: {why}. fastattn installs without them "
            "(the numpy and numba backends work); reinstall with Cython and a C compiler to get the cython backend."
        )
        self.extensions[:] = []

    def build_extensions(self):
        compiler_type = self.compiler.compiler_type
        problem = self._try_program(PLAIN_TEST, [])
        if problem is not None:
            raise _NoCompiler(f"no working C compiler ({problem})")
        openmp_flags = self._openmp_flags(compiler_type)
        if compiler_type == "msvc":
            compile_args = ["/O2"]
        else:
            # -O3 and flags that leave results unchanged: no errno from libm (lets sqrt/exp inline), no FP-trap
            # semantics (lets gcc vectorise the branch-free selects of the softmax), no debug info. And
            # -ffp-contract=fast, GCC's own default in its GNU C modes, pinned for builds that ask for ISO C: a*b + c
            # may become one FMA (one rounding instead of two), which the tile products of _tile_gemm.h rely on.
            compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-g0"]
            if _env_flag("FASTATTN_NATIVE"):
                compile_args.append("-march=native")
        for ext in list(self.extensions):
            isa = getattr(ext, "fastattn_isa", None)
            isa_flags = []
            if isa is not None:
                problem = None if compiler_type == "unix" else f"{compiler_type} compiler"
                problem = problem or self._try_program(PLAIN_TEST, ISA_FLAGS[isa])
                if problem is not None:
                    _warn(f"the {isa} variant of {ext.name} is not built ({problem}); the baseline build serves")
                    self.extensions.remove(ext)
                    continue
                isa_flags = ISA_FLAGS[isa]
            ext.extra_compile_args = compile_args + isa_flags + openmp_flags
            ext.extra_link_args = list(openmp_flags)
        super().build_extensions()

    def build_extension(self, ext):
        if getattr(ext, "fastattn_isa", None) is None:
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - a variant is a bonus: the baseline build serves
            ext.fastattn_failed = True
            _warn(f"the {ext.fastattn_isa} variant of {ext.name} failed to build ({exc}); the baseline build serves")

    def copy_extensions_to_source(self):
        built = self.extensions
        self.extensions = [ext for ext in built if not getattr(ext, "fastattn_failed", False)]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built

    def _openmp_flags(self, compiler_type):
        flags = ["/openmp"] if compiler_type == "msvc" else ["-fopenmp"]
        problem = self._try_program(OPENMP_TEST, flags, expect="1")
        if problem is None:
            return flags
        message = (
            f"OpenMP is not available with this compiler ({problem}); the Cython kernels are built serial "
            "(one thread). Install an OpenMP runtime (e.g. libgomp with gcc, libomp with clang) and reinstall."
        )
        if _env_flag("FASTATTN_FAIL_NO_OPENMP"):
            raise _NoOpenMP(f"FASTATTN_FAIL_NO_OPENMP=1: {message}")
        _warn(message)
        return []

    def _try_program(self, code, flags, expect=None):
        """None when `code` compiles, links and runs with `flags` (printing `expect`), else what went wrong."""
        tmp = tempfile.mkdtemp(prefix="fastattn_probe_")
        try:
            src = os.path.join(tmp, "test_openmp.c")
            with open(src, "w") as f:
                f.write(code)
            try:
                objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                exe = os.path.join(tmp, "test_openmp")
                self.compiler.link_executable(objects, "test_openmp", output_dir=tmp, extra_postargs=flags)
            except Exception as exc:  # noqa: BLE001
                return f"the test program does not build: {type(exc).__name__}"
            if expect is None or os.environ.get("CROSS_COMPILING"):
                return None
            try:
                output = subprocess.run([exe], capture_output=True, text=True, timeout=60, check=True).stdout
            except Exception as exc:  # noqa: BLE001
                return f"the test program does not run: {type(exc).__name__}"
            return None if output.strip() == expect else f"the test program printed {output.strip()!r}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
