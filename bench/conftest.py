"""pytest-benchmark suites of fastattn: shared machinery.

Run them with ``python -m pytest bench --benchmark-enable`` (the project's pytest settings disable benchmarks so
that ``python -m pytest`` stays a test run). What this file provides:

- collection of ``bench_*.py`` modules (pytest itself only collects ``test_*.py``);
- ``--bench-grid {full,quick,smoke}`` (or ``FASTATTN_BENCH_GRID``): which explicit grid the modules use. Each module
  spells out its grids at its top; ``smoke`` is tiny, for checking that the suites run;
- ``--bench-threads N`` (or ``FASTATTN_BENCH_THREADS``): one thread count for fastattn, PyTorch and NumPy's BLAS
  (the last only with threadpoolctl installed) for the whole session;
- the ``fa_kernels`` fixture (a backend's raw kernels, or a clean skip with the reason when the backend is unavailable
  or raises on first use), the ``torch`` fixture (PyTorch, or a clean skip), and the ``measure`` fixture, which
  calls the code once outside the timing (Numba compiles there), names the benchmark group after the shape so that
  one table compares the backends on one shape, runs the benchmark (a fixed few rounds for calls slower than a
  quarter second) and stores GFLOP/s or GB/s in ``extra_info``;
- a closing summary table of the achieved rates and the speed-up over the oracle (or baseline) of each group, and
  the same speed-ups (``vs_baseline``, ``vs_torch``) written into ``extra_info`` of a saved run.
"""

from __future__ import annotations

import os

import pytest

from fastattn.tools import timing as _timing

GRIDS = ("full", "quick", "smoke")
#: A call slower than this is benchmarked in a fixed few rounds (``benchmark.pedantic``) instead of calibrated ones.
SLOW_CALL_S = 0.25
SLOW_ROUNDS = 3

_results: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("fastattn benchmarks")
    group.addoption(
        "--bench-grid",
        choices=GRIDS,
        default=os.environ.get("FASTATTN_BENCH_GRID", "full"),
        help="which grid of shapes the bench_*.py suites use (default full, or $FASTATTN_BENCH_GRID)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("FASTATTN_BENCH_THREADS", "0")) or None,
        help="threads for fastattn, PyTorch and NumPy's BLAS (default: as configured, or $FASTATTN_BENCH_THREADS)",
    )


def pytest_configure(config):
    # The modules read the grid when pytest imports them, which comes after this hook.
    os.environ["FASTATTN_BENCH_GRID"] = config.getoption("--bench-grid")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` beside this file (files named on the command line are collected by pytest itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session", autouse=True)
def pinned_threads(request):
    """Pin threads for the session (after importing PyTorch, when installed, so that it is pinned too)."""
    _timing.optional_import("torch")
    with _timing.pin_threads(request.config.getoption("--bench-threads")) as threads:
        yield threads


@pytest.fixture(scope="session")
def torch():
    module, reason = _timing.optional_import("torch")
    if module is None:
        pytest.skip(f"PyTorch peer: {reason}")
    return module


@pytest.fixture(scope="session")
def fa_kernels():
    """``fa_kernels(name, family=None)``: the raw kernel module of backend ``name`` (``family="blocks"``: its
    transformer-block kernels), or skip with the reason it cannot run."""
    from fastattn import _backends

    def get(name, family=None):
        reason = _timing.backend_reasons([name])[name]
        if reason is not None:
            pytest.skip(f"backend {name} unavailable: {reason}")
        try:
            return _backends.kernels(name, family)
        except Exception as exc:
            pytest.skip(f"backend {name} raised on first use: {_timing.first_use_error(exc)}")

    return get


def shape_id(**dims) -> str:
    """A readable id for a shape parameter: ``shape_id(N=1024, d=64)`` -> ``"N1024-d64"``."""
    return "-".join(f"{k}{v}" for k, v in dims.items())


@pytest.fixture
def measure(benchmark, pinned_threads):
    """``measure(fn, group=..., backend=..., role=..., flop=... or nbytes=..., **info)``: benchmark ``fn`` (no
    arguments, its data made beforehand), group it, and record its rate. ``role`` is ``"fastattn"``, ``"baseline"``
    (the row the group's speed-ups are taken over: the oracle, or numpy ``table[ids]`` for gathers) or ``"peer"``
    (PyTorch; the row named ``"torch"`` is the one speed-ups are taken over). Skips cleanly when ``fn`` raises on
    its first call."""

    def run(
        fn,
        *,
        group: str,
        backend: str,
        role: str = "fastattn",
        flop: float | None = None,
        nbytes: float | None = None,
        **info,
    ):
        clock = _timing.clock
        benchmark.group = group
        if benchmark.disabled:  # --benchmark-disable (the project default): one call, as a test
            try:
                return benchmark(fn)
            except Exception as exc:
                pytest.skip(f"{backend} raised on first use: {_timing.first_use_error(exc)}")
        try:
            start = clock()
            fn()
            first = clock() - start
            start = clock()
            fn()
            second = clock() - start
        except Exception as exc:  # a backend still being written, or a peer that cannot do this case
            pytest.skip(f"{backend} raised on first use: {_timing.first_use_error(exc)}")
        benchmark.extra_info.update(
            {
                "backend": backend,
                "role": role,
                "first_call_s": first,
                "flop": flop,
                "bytes": nbytes,
                "threads": pinned_threads.get("fastattn"),
                **info,
            }
        )
        if second > SLOW_CALL_S:
            result = benchmark.pedantic(fn, rounds=SLOW_ROUNDS, iterations=1)
        else:
            result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            median = stats.stats.median
            if flop:
                benchmark.extra_info["gflops"] = flop / median / 1e9
            if nbytes:
                benchmark.extra_info["gbps"] = nbytes / median / 1e9
            _results.append({"group": group, "backend": backend, "median_s": median, **benchmark.extra_info})
        return result

    return run


def _speedups(rows):
    """Per group: the speed-up of each row over the baseline row and over the ``torch`` row, where present."""
    by_group: dict = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group_rows in by_group.values():
        base = next((r for r in group_rows if r["role"] == "baseline"), None)
        peer = next((r for r in group_rows if r["backend"] == "torch"), None)
        for r in group_rows:
            r["vs_baseline"] = base["median_s"] / r["median_s"] if base else None
            r["vs_torch"] = peer["median_s"] / r["median_s"] if peer else None
    return by_group


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """A saved run (``--benchmark-save``/``--benchmark-json``) carries the speed-ups in each ``extra_info``."""
    rows = [
        {
            "group": b["group"],
            "backend": b["extra_info"].get("backend", ""),
            "role": b["extra_info"].get("role", ""),
            "median_s": b["stats"]["median"],
            "b": b,
        }
        for b in output_json.get("benchmarks", [])
        if b.get("stats")
    ]
    _speedups(rows)
    for r in rows:
        r["b"]["extra_info"]["vs_baseline"] = r["vs_baseline"]
        r["b"]["extra_info"]["vs_torch"] = r["vs_torch"]


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the figures were measured on, beyond pytest-benchmark's own: CPU flags, versions, backends, threads."""
    machine_info["fastattn"] = _timing.machine_info()
    machine_info["fastattn"]["bench_grid"] = config.getoption("--bench-grid")
    machine_info["fastattn"]["bench_threads"] = config.getoption("--bench-threads")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    tr = terminalreporter
    tr.section("fastattn: achieved rates (median) and speed-ups within each group")
    tr.write_line("x base: over the oracle, or for gathers numpy table[ids]; x torch: over the PyTorch peer")
    for group, rows in sorted(_speedups(_results).items()):
        tr.write_line(group)
        for r in sorted(rows, key=lambda r: r["median_s"]):
            rate = (
                _timing.format_rate(r["gflops"], "GFLOP/s")
                if r.get("gflops") is not None
                else _timing.format_rate(r.get("gbps"), "GB/s")
            )
            base = _timing.format_ratio(r["vs_baseline"])
            peer = _timing.format_ratio(r["vs_torch"])
            tr.write_line(
                f"  {r['backend']:<20} {_timing.format_seconds(r['median_s']):>10} {rate:>16} "
                f"x base {base:>8}  x torch {peer:>8}"
            )


@pytest.fixture(scope="session")
def torch_self_attention(torch):
    """``torch_self_attention(w_q, w_k, w_v, w_o, n_heads, causal)`` -> ``fn(tx)``: fastattn's self-attention
    (``x @ w`` projections, heads split, ``scaled_dot_product_attention``, heads merged, ``@ w_o``) in PyTorch."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def build(w_q, w_k, w_v, w_o, n_heads, causal):
        tw = [torch.from_numpy(w) for w in (w_q, w_k, w_v, w_o)]

        def fn(tx):
            B, N, _ = tx.shape
            with torch.no_grad():
                q, k, v = (
                    torch.matmul(tx, w).view(B, N, n_heads, w.shape[1] // n_heads).transpose(1, 2) for w in tw[:3]
                )
                o = sdpa(q, k, v, is_causal=causal)  # (B, H, N, d)
                return torch.matmul(o.transpose(1, 2).reshape(B, N, -1), tw[3])

        return fn

    return build
