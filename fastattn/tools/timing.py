"""Timing machinery shared by ``python -m fastattn bench`` and ``python -m fastattn profile``.

Nothing here imports Numba or PyTorch at module level: the command line must parse its arguments without them.

- ``Contender`` and ``run_interleaved``: time several callables side by side, one sample of each per round (the
  order rotated each round), so that drift of the machine (frequency, other load) hits every contender alike.
  The first call of each is timed apart (Numba compiles there) and never counted as a sample.
- ``summarise``: median, quartiles and the spread (interquartile range over the median) of the samples.
- ``pin_threads``: one thread count for fastattn's compiled backends, PyTorch and NumPy's BLAS (via threadpoolctl,
  when installed), restored afterwards.
- ``matmul_peak``: this machine's matrix-multiply GFLOP/s, measured now, as the yardstick for "share of peak".
- ``machine_info``: what the figures were measured on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable

__all__ = [
    "Contender",
    "Stats",
    "summarise",
    "run_interleaved",
    "first_use_error",
    "optional_import",
    "backend_reasons",
    "pin_threads",
    "matmul_peak",
    "machine_info",
    "machine_line",
    "isa_in_use",
    "Progress",
    "attention_flop",
    "format_seconds",
    "format_rate",
    "format_ratio",
]

clock = time.perf_counter


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of per-call times in seconds. ``spread`` is the interquartile range relative to the median."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (NumPy's default) of an already sorted list."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise(samples: list[float]) -> Stats:
    if not samples:
        raise ValueError("summarise needs at least one sample")
    s = sorted(samples)
    return Stats(_quantile(s, 0.5), _quantile(s, 0.25), _quantile(s, 0.75), s[0], s[-1], len(s))


# --------------------------------------------------------------------------------------------------------------
# Contenders timed side by side
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Contender:
    """One callable to time. ``fn`` takes no argument: its data is made beforehand, outside the timed code.

    After ``run_interleaved``: ``first_call_s`` (the first call, never a sample: compilation, cache loading, first
    touch of memory), ``samples`` (seconds per call, one per round), ``inner`` (calls per sample, so that a sample
    lasts at least ``min_sample_s``), ``rounds`` and ``error`` (why it was dropped, if it raised).
    """

    name: str
    fn: Callable[[], object]
    info: dict = dataclasses.field(default_factory=dict)
    max_rounds: int | None = None
    first_call_s: float | None = None
    samples: list[float] = dataclasses.field(default_factory=list)
    inner: int = 1
    rounds: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    def stats(self) -> Stats | None:
        return summarise(self.samples) if self.samples else None


def first_use_error(exc: BaseException) -> str:
    """A one-line reason for a contender that raised."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _time_once(fn) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def _steady_estimate(fn, min_sample_s: float, most: int = 5) -> float:
    """The fastest of a few calls after the first (at most ``most``, stopping once ``min_sample_s`` is spent)."""
    best, spent = math.inf, 0.0
    for _ in range(most):
        t, _ = _time_once(fn)
        best, spent = min(best, t), spent + t
        if spent >= min_sample_s:
            break
    return best


def run_interleaved(
    contenders: list[Contender],
    *,
    rounds: int,
    min_sample_s: float = 0.005,
    budget_s: float = 2.0,
    min_rounds: int = 3,
    max_inner: int = 10_000,
    on_skip: Callable[[Contender], None] | None = None,
    on_first: Callable[[Contender, object], None] | None = None,
) -> list[Contender]:
    """Time ``contenders`` side by side: a first call each, then ``rounds`` rounds of one sample each.

    Calibration: after the first call, the fastest of a few more calls estimates the steady time ``t``; a sample
    then repeats the call ``inner = ceil(min_sample_s / t)`` times (timer resolution and call overhead vanish) and
    records the time per call. A contender whose ``rounds`` samples would exceed ``budget_s`` takes fewer rounds,
    never fewer than ``min_rounds`` (nor more than its own ``max_rounds``): slow contenders (the oracle at large N)
    stay measured without dominating the run. Round ``r`` visits the contenders in an order rotated by ``r``.
    A contender that raises is dropped with ``error`` set (and ``on_skip`` called); the others go on.
    ``on_first(contender, result)`` sees the return value of each first call (to check it), in list order.
    Garbage collection is off while timing.
    """
    live = []
    for c in contenders:
        c.samples, c.error, c.rounds, c.inner = [], None, 0, 1
        try:
            c.first_call_s, result = _time_once(c.fn)
            if on_first is not None:
                on_first(c, result)
            del result
            steady = _steady_estimate(c.fn, min_sample_s)
        except Exception as exc:  # a backend still being written, a peer that cannot run this case...
            c.error = first_use_error(exc)
            if on_skip is not None:
                on_skip(c)
            continue
        steady = max(steady, 1e-7)
        c.inner = 1 if steady >= min_sample_s else min(max_inner, math.ceil(min_sample_s / steady))
        sample_s = steady * c.inner
        want = rounds if c.max_rounds is None else min(rounds, c.max_rounds)
        affordable = int(budget_s // sample_s) if sample_s > 0 else want
        c.rounds = max(min(want, affordable), min(min_rounds, want))
        live.append(c)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        total_rounds = max((c.rounds for c in live), default=0)
        for r in range(total_rounds):
            order = [c for c in live if c.error is None and r < c.rounds]
            if not order:
                break
            shift = r % len(order)
            for c in order[shift:] + order[:shift]:
                fn, inner = c.fn, c.inner
                try:
                    start = clock()
                    for _ in range(inner):
                        fn()
                    c.samples.append((clock() - start) / inner)
                except Exception as exc:
                    c.error = first_use_error(exc)
                    if on_skip is not None:
                        on_skip(c)
    finally:
        if gc_was_enabled:
            gc.enable()
    return contenders


# --------------------------------------------------------------------------------------------------------------
# Optional dependencies and threads
# --------------------------------------------------------------------------------------------------------------
def optional_import(name: str):
    """``(module, None)`` or ``(None, reason)``; never raises. For peers such as torch, matplotlib, threadpoolctl."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{name} is not installed ({first_use_error(exc)})"


def backend_reasons(names=None) -> dict[str, str | None]:
    """``fastattn.backend_status()`` one backend at a time: a backend whose probe itself raises (a half-built
    extension raising something other than ImportError) is reported with that error instead of breaking the rest."""
    from .. import _backends

    out = {}
    for name in _backends.NAMES if names is None else names:
        try:
            out[name] = _backends._probe(name)
        except Exception as exc:
            out[name] = f"probing it raised {first_use_error(exc)}"
    return out


def _numpy_blas_controllers():
    """threadpoolctl controllers of NumPy's own BLAS only (never SciPy's, which the Numba backend keeps at one
    thread inside its parallel loops). Empty when threadpoolctl is missing."""
    tpc, _ = optional_import("threadpoolctl")
    if tpc is None:
        return []
    try:
        controller = tpc.ThreadpoolController()
    except Exception:
        return []
    return [
        m
        for m in controller.lib_controllers
        if m.user_api == "blas" and "numpy" in os.path.normpath(m.filepath).split(os.sep)[-2].lower()
    ]


@contextlib.contextmanager
def pin_threads(n: int | None):
    """Use ``n`` threads in fastattn's compiled backends, PyTorch (if imported) and NumPy's BLAS (if threadpoolctl is
    installed); restore all on exit. ``None`` changes nothing. Yields a dict saying what each one uses."""
    import fastattn

    report: dict[str, object] = {}
    undo: list[Callable[[], None]] = []
    try:
        if n is not None:
            try:
                setting = fastattn.set_num_threads(n)
            except ValueError:  # a count the backends refuse: the caller says so
                raise
            except Exception as exc:  # a backend broken while it loads: the others run unpinned, and we say why
                report["fastattn_error"] = f"threads not set: {first_use_error(exc)}"
            else:
                undo.append(lambda: setting.__exit__(None, None, None))
        report["fastattn"] = fastattn.get_num_threads()
        torch = sys.modules.get("torch")
        if torch is not None:
            if n is not None:
                before = torch.get_num_threads()
                torch.set_num_threads(n)
                undo.append(lambda: torch.set_num_threads(before))
            report["torch"] = torch.get_num_threads()
        blas = _numpy_blas_controllers()
        if blas:
            if n is not None:
                for m in blas:
                    before_m = m.num_threads
                    m.set_num_threads(n)
                    undo.append(lambda m=m, b=before_m: m.set_num_threads(b))
            report["numpy_blas"] = blas[0].num_threads
        else:
            report["numpy_blas"] = "not controlled (install threadpoolctl to pin NumPy's BLAS threads)"
        yield report
    finally:
        for action in reversed(undo):
            action()


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5, use_torch: bool = True) -> dict:
    """This machine's matrix-multiply rate now: the best of ``repeats`` square ``size`` products, in GFLOP/s.

    Measured with NumPy's ``@`` (its BLAS) and, where installed and allowed, ``torch.matmul``; the faster of the
    two is the peak. Runs under whatever threads are pinned at the time of the call.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    flop = 2.0 * size**3
    found = {}

    def best(fn):
        fn()  # warm up: threads started, pages touched
        return min(_time_once(fn)[0] for _ in range(repeats))

    found["numpy"] = flop / best(lambda: a @ b) / 1e9
    torch = sys.modules.get("torch") if use_torch else None
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        found["torch"] = flop / best(lambda: torch.matmul(ta, tb)) / 1e9
    source = max(found, key=found.get)
    return {"gflops": found[source], "source": f"{source} {size}x{size} {dtype} matmul", "all": found}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _version(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is None:
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:
            return None
    return getattr(module, "__version__", None)


def isa_in_use() -> dict[str, str]:
    """The instruction set each compiled backend runs here: Numba compiles for this CPU (its widest ISA); Cython
    loads the widest build the CPU runs up to ``FASTATTN_CYTHON_ISA`` (only asked of a backend already loaded)."""
    from fastattn import _backends, _plans

    found = {}
    for (name, part), mod in _backends.loaded_modules().items():
        if part != "pipeline":
            continue
        if name == "numba":
            found[name] = f"{_plans.cpu_isa()} (LLVM, host CPU)"
        elif name == "cython" and hasattr(mod, "isa"):
            found[name] = f"{mod.isa()} build"
    return found


def machine_info() -> dict:
    """The hardware and software the figures come from: the CPU (model name from the OS, with family and model
    numbers), its ISA and the ISA each loaded backend runs, the thread count, and the plan each backend runs."""
    import fastattn
    from fastattn import _plans

    flags = _cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        info = fastattn.plan_info()
        plans = {b: p.get("plan", "unavailable") + f" ({p.get('source', p.get('unavailable'))})"
                 for b, p in info["backends"].items()}  # fmt: skip
        automatic = info["why"]
    except Exception as exc:  # a broken plan never hides the figures
        plans, automatic = {"error": first_use_error(exc)}, None
    return {
        "cpu": _plans.cpu_id(),
        "cpu_model": _cpu_model(),
        "cpu_family": _plans.FAMILY_NAMES[_plans.cpu_family()],
        "isa": _plans.cpu_isa(),
        "isa_in_use": isa_in_use(),
        "threads": fastattn.get_num_threads(),
        "plans": plans,
        "automatic_backend": automatic,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastattn": fastattn.__version__,
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "threadpoolctl": _version("threadpoolctl"),
        "backends": backend_reasons(),
    }


def machine_line(m: dict, threads=None) -> str:
    """One line naming where figures come from: CPU, ISA (and per backend in use), threads."""
    used = m.get("isa_in_use") or {}
    isa = m.get("isa", "?") + (" (" + ", ".join(f"{b}: {i}" for b, i in used.items()) + ")" if used else "")
    n = m.get("threads") if threads is None else threads
    return f"{m['cpu']}, ISA {isa}, {n} threads"


# --------------------------------------------------------------------------------------------------------------
# Progress, counts and formatting
# --------------------------------------------------------------------------------------------------------------
class Progress:
    """Progress lines on stderr: ``[3/12  14 s] what``. On a terminal a line is overwritten by the next."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = sys.stderr if stream is None else stream
        self.start = clock()
        self.done = 0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def elapsed(self) -> float:
        return clock() - self.start

    def step(self, what: str) -> None:
        self.done += 1
        self.note(f"[{self.done}/{self.total} {self.elapsed():5.0f} s] {what}", transient=True)

    def note(self, text: str, transient: bool = False) -> None:
        if not self.enabled:
            return
        if self._tty and transient:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(("\r\x1b[2K" if self._tty else "") + text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def attention_flop(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool) -> float:
    """Useful FLOPs of attention: 2·L·S·d for QKᵀ plus 2·L·S·d for PV per head, so 4·N²·d·H for L = S = N;
    half of it when causal (the convention of flash-attention's benchmarks)."""
    flop = 4.0 * batch * heads * n_q * n_k * head_dim
    return flop / 2 if causal else flop


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def format_rate(value: float | None, unit: str = "") -> str:
    """Three significant digits (no exponent): 1234 -> "1234", 12.34 -> "12.3", 0.001234 -> "0.00123"."""
    if value is None:
        return "-"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return text + (f" {unit}" if unit else "")


def format_ratio(value: float | None) -> str:
    """A speed-up: "274x", "12.3x", "1.00x", "0.45x", "0.0496x"."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}x"
    if value >= 10:
        return f"{value:.1f}x"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3g}x"
