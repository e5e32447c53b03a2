"""``python -m fastattn bench``, its timing machinery, and the pytest-benchmark suites in ``bench/``.

Small sizes only: these check that the tools run, measure what they say and write what they document, not how fast
anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn
from fastattn import _backends, _timing, bench

ROOT = Path(__file__).resolve().parents[1]
HAVE_TORCH = _timing.optional_import("torch")[0] is not None
HAVE_MPL = _timing.optional_import("matplotlib")[0] is not None

RECORD_FIELDS = {
    "family",
    "dtype",
    "contender",
    "kind",
    "backend",
    "median_s",
    "p25_s",
    "p75_s",
    "min_s",
    "spread",
    "rounds",
    "inner",
    "first_call_s",
    "flop",
    "gflops",
    "bytes",
    "gbps",
    "peak_share",
    "baseline",
    "vs_baseline",
    "vs_torch",
    "check",
    "error",
}
TINY = [
    "-n",
    "16,32",
    "--heads",
    "2",
    "--head-dim",
    "8",
    "--tokens",
    "64",
    "--vocab",
    "100",
    "--d-model",
    "16",
    "--rounds",
    "3",
    "--min-sample-ms",
    "0.2",
    "--budget-s",
    "0.1",
    "--threads",
    "1",
]


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def run_cli(*argv, cwd, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", "fastattn", *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------
def test_parsing_the_arguments_imports_neither_numba_nor_torch():
    code = (
        "import argparse, sys\n"
        "from fastattn import __main__, bench, profile\n"
        "for m in (bench, profile):\n"
        "    m.add_arguments(argparse.ArgumentParser())\n"
        "try:\n"
        "    __main__.main(['bench', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('numba', 'torch', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "fastattn", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--quick", "--seq-lens", "--dtypes", "--backends", "--threads", "--json", "--no-plot", "--masks"):
        assert option in out.stdout


def test_the_default_grid_is_the_documented_one():
    full = bench.settings_from(parse([]))
    assert full["seq_lens"] == (128, 512, 1024, 2048, 4096)
    assert (full["batch"], full["heads"], full["head_dim"]) == (1, 12, 64)
    assert full["dtypes"] == ("float32",) and full["masks"] == ("full", "causal")
    assert 65536 in full["tokens"] and (full["vocab"], full["d_model"]) == (50257, 768)
    quick = bench.settings_from(parse(["--quick"]))
    assert quick["grid"] == "quick" and max(quick["seq_lens"]) <= 512
    custom = bench.settings_from(parse(["--quick", "-n", "64", "--dtypes", "float64", "--threads", "1"]))
    assert custom["seq_lens"] == (64,) and custom["dtypes"] == ("float64",) and custom["threads"] == 1


@pytest.mark.parametrize("argv", [["-n", "0"], ["-n", "a,b"], ["--dtypes", "float16"], ["--backends", "cuda"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        parse(argv)


def test_a_tiny_run_prints_the_table_and_writes_json_and_png(tmp_path):
    path = tmp_path / "out" / "run.json"
    out = run_cli("bench", *TINY, "--json", str(path), cwd=tmp_path)
    for heading in ("median", "IQR/med", "GFLOP/s", "GB/s", "%peak", "x oracle", "x table[ids]", "first call"):
        assert heading in out.stdout
    assert "[1/" in out.stderr  # progress
    doc = json.loads(path.read_text())
    assert doc["schema"] == "fastattn.bench/1"
    assert doc["command"].startswith("python -m fastattn bench -n 16,32")
    for key in ("created", "elapsed_s", "machine", "settings", "threads", "peak", "skipped", "results", "plot"):
        assert key in doc
    assert doc["machine"]["logical_cores"] >= 1 and "avx512f" in doc["machine"]
    assert doc["threads"]["fastattn"] == 1
    assert doc["peak"]["float32"]["gflops"] > 0
    results = doc["results"]
    assert {r["family"] for r in results} == {"attention", "embedding"}
    for r in results:
        assert RECORD_FIELDS <= set(r)
    ok = [r for r in results if r["error"] is None]
    names = {r["contender"] for r in ok}
    assert {"oracle", "numpy table[ids]"} <= names
    compiled = [b for b in fastattn.available_backends() if b != "numpy"]
    for b in compiled:
        assert {f"{b} fused", f"{b} stages", f"{b} gather"} & {r["contender"] for r in results}
    assert ("torch sdpa" in names) == HAVE_TORCH
    # 2 masks x 2 sizes of attention, 1 embedding size: each contender measured at each point
    assert sum(r["contender"] == "oracle" for r in ok) == 4
    for r in ok:
        assert r["median_s"] > 0 and r["rounds"] >= 3 and r["p25_s"] <= r["median_s"] <= r["p75_s"]
        assert r["check"] is None, r  # every result agrees with its point's reference
        if r["family"] == "attention":
            assert r["gflops"] == pytest.approx(r["flop"] / r["median_s"] / 1e9)
            assert r["peak_share"] == pytest.approx(r["gflops"] / doc["peak"]["float32"]["gflops"])
        else:
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9) and r["gflops"] is None
        if r["contender"] == r["baseline"]:
            assert r["vs_baseline"] == pytest.approx(1.0)
    causal = next(r for r in ok if r["contender"] == "oracle" and r["causal"] and r["seq_len"] == 32)
    full = next(r for r in ok if r["contender"] == "oracle" and not r["causal"] and r["seq_len"] == 32)
    assert causal["flop"] == full["flop"] / 2 == 4 * 32 * 32 * 8 * 2 / 2
    if HAVE_MPL:
        assert doc["plot"] == str(path.with_suffix(".png"))
        assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert doc["plot"] is None


def test_the_default_json_path_is_under_bench_results(tmp_path):
    run_cli("bench", *TINY, "--families", "embedding", "--no-torch", "--no-plot", "--no-progress", cwd=tmp_path)
    written = list((tmp_path / "bench_results").glob("bench-*.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["torch"] is None


class _Unfinished:
    """The numpy backend's kernels, except a fused attention that raises: a backend still being written."""

    def __init__(self):
        self._numpy = _backends.kernels("numpy")

    def __getattr__(self, name):
        return getattr(self._numpy, name)

    def attention(self, *args):
        raise NotImplementedError("fused kernel not written yet")


def test_a_backend_that_raises_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_compiled_kernels", lambda wanted, say: {"numba": _Unfinished()})
    path = tmp_path / "r.json"
    args = parse([*TINY, "-n", "16", "--families", "attention", "--no-torch", "--no-plot", "--json", str(path)])
    assert bench.run(args) == 0
    captured = capsys.readouterr()
    assert "numba fused skipped: NotImplementedError: fused kernel not written yet" in captured.err
    assert "skipped: NotImplementedError" in captured.out
    rows = {r["contender"]: r for r in json.loads(path.read_text())["results"] if not r["causal"]}
    assert rows["numba fused"]["error"].startswith("NotImplementedError") and rows["numba fused"]["median_s"] is None
    assert rows["numba stages"]["error"] is None and rows["numba stages"]["median_s"] > 0


def test_an_unavailable_backend_is_reported(capsys, monkeypatch):
    probes = {"numpy": None, "numba": "not here", "cython": None}
    monkeypatch.setattr(_backends, "_probe", probes.get)
    monkeypatch.setattr(_backends, "kernels", lambda name: (_ for _ in ()).throw(ValueError("broken build")))
    found = bench._compiled_kernels(["numba", "cython"], lambda text: print(text, file=sys.stderr))
    assert found == {}
    err = capsys.readouterr().err
    assert "skipping backend numba: not here" in err
    assert "skipping backend cython: it raised on first use: ValueError: broken build" in err


def test_a_backend_whose_probe_raises_is_reported_not_fatal(monkeypatch):
    def probe(name):
        if name == "cython":
            raise AttributeError("module has no attribute 'cpu_supports'")
        return None

    monkeypatch.setattr(_backends, "_probe", probe)
    reasons = _timing.backend_reasons()
    assert reasons["numpy"] is None
    assert reasons["cython"] == "probing it raised AttributeError: module has no attribute 'cpu_supports'"
    assert _timing.machine_info()["backends"] == reasons


# --------------------------------------------------------------------------------------------------------------
# The timing machinery
# --------------------------------------------------------------------------------------------------------------
def test_contenders_are_interleaved_round_by_round():
    log = []
    cs = [_timing.Contender(name, lambda name=name: log.append(name)) for name in "abc"]
    _timing.run_interleaved(cs, rounds=4, min_sample_s=0.0, budget_s=10.0)
    timed = log[-12:]  # after each contender's first call and calibration
    assert [sorted(timed[i : i + 3]) for i in range(0, 12, 3)] == [["a", "b", "c"]] * 4
    assert timed[:3] == ["a", "b", "c"] and timed[3:6] == ["b", "c", "a"]  # the order rotates
    assert all(c.ok and len(c.samples) == 4 and c.inner == 1 for c in cs)


def test_slow_contenders_take_fewer_rounds_but_at_least_the_minimum():
    import time

    slow = _timing.Contender("slow", lambda: time.sleep(0.01))
    fast = _timing.Contender("fast", lambda: None)
    _timing.run_interleaved([slow, fast], rounds=20, min_sample_s=0.001, budget_s=0.03, min_rounds=3)
    assert len(slow.samples) == 3
    assert len(fast.samples) == 20 and fast.inner > 1
    assert slow.stats().median >= 0.009


def test_a_contender_that_raises_is_dropped_and_the_others_go_on():
    def boom():
        raise RuntimeError("first use failed\nsecond line")

    skipped = []
    bad, good = _timing.Contender("bad", boom), _timing.Contender("good", lambda: 1)
    _timing.run_interleaved([bad, good], rounds=3, min_sample_s=0.0, on_skip=skipped.append)
    assert bad.error == "RuntimeError: first use failed" and not bad.ok and skipped == [bad]
    assert good.ok and len(good.samples) == 3


def test_summarise_matches_numpy_percentiles():
    rng = np.random.default_rng(1)
    samples = list(rng.random(17))
    s = _timing.summarise(samples)
    assert s.median == pytest.approx(np.median(samples))
    assert (s.p25, s.p75) == pytest.approx(tuple(np.percentile(samples, [25, 75])))
    assert s.spread == pytest.approx((s.p75 - s.p25) / s.median)
    assert (s.min, s.max, s.n) == (min(samples), max(samples), 17)


def test_attention_flop_and_formatting():
    assert _timing.attention_flop(1, 12, 4096, 4096, 64, False) == 4 * 4096**2 * 64 * 12
    assert _timing.attention_flop(1, 12, 4096, 4096, 64, True) == 2 * 4096**2 * 64 * 12
    assert _timing.format_seconds(0.0123) == "12.30 ms" and _timing.format_seconds(2.5) == "2.50 s"
    assert _timing.format_rate(1234.5, "GFLOP/s") == "1234 GFLOP/s" and _timing.format_rate(0.001234) == "0.00123"
    assert [_timing.format_ratio(x) for x in (274.4, 12.34, 1.0, 0.45, 0.04963, None)] == [
        "274x",
        "12.3x",
        "1.00x",
        "0.45x",
        "0.0496x",
        "-",
    ]


def test_pin_threads_sets_and_restores():
    before = fastattn.get_num_threads()
    with _timing.pin_threads(1) as report:
        assert fastattn.get_num_threads() == 1 and report["fastattn"] == 1
    assert fastattn.get_num_threads() == before


def test_matmul_peak_is_measured():
    peak = _timing.matmul_peak("float32", size=128, repeats=2, use_torch=False)
    assert peak["gflops"] > 0 and peak["source"] == "numpy 128x128 float32 matmul"


# --------------------------------------------------------------------------------------------------------------
# The pytest-benchmark suites
# --------------------------------------------------------------------------------------------------------------
SUITES = [
    "bench_embedding.py",
    "bench_positions.py",
    "bench_attention_stages.py",
    "bench_attention_fused.py",
    "bench_attention_backward.py",
    "bench_self_attention.py",
    "bench_forward.py",
]


def _pytest_bench(*argv, paths=tuple(ROOT / "bench" / name for name in SUITES)):
    cmd = [sys.executable, "-m", "pytest", *map(str, paths), "--bench-grid=smoke", "-q", "-p", "no:cacheprovider"]
    env = dict(os.environ, FASTATTN_BENCH_GRID="smoke")
    out = subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def test_every_suite_runs_on_the_smoke_grid():
    """Benchmarks disabled (the project default): each case runs once, as a test; peers skip cleanly."""
    out = _pytest_bench("-k", "float32", "-rs", "-vv")  # -q -vv: one line per case
    assert " passed" in out.stdout and " failed" not in out.stdout
    for name in SUITES:  # every module ran cases: at least its oracle or baseline ones pass everywhere
        assert any(f"{name}::" in line and "PASSED" in line for line in out.stdout.splitlines()), name


def test_bench_modules_are_collected_by_the_conftest():
    """``bench_*.py`` is not pytest's file pattern: bench/conftest.py collects it when the folder is named."""
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench"), "--bench-grid=smoke", "--collect-only", "-q"]
    out = subprocess.run([*cmd, "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in SUITES:
        assert f"bench/{name}::" in out.stdout


def test_a_saved_run_groups_backends_by_shape_and_carries_rates(tmp_path):
    path = tmp_path / "bench.json"
    _pytest_bench(
        "-k",
        "test_attention and float32 and causal",
        "--benchmark-enable",
        "--benchmark-max-time=0.002",
        "--benchmark-min-rounds=2",
        f"--benchmark-json={path}",
        paths=[ROOT / "bench" / "bench_attention_fused.py"],
    )
    doc = json.loads(path.read_text())
    assert doc["machine_info"]["fastattn"]["bench_grid"] == "smoke"
    groups = {}
    for b in doc["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    assert list(groups) == ["attention fused float32 B1-H2-N16-d8 causal"]
    rows = {b["extra_info"]["backend"]: b["extra_info"] for b in groups["attention fused float32 B1-H2-N16-d8 causal"]}
    assert rows["oracle"]["vs_baseline"] == pytest.approx(1.0)
    for info in rows.values():
        assert info["gflops"] > 0 and info["flop"] == 4 * 16 * 16 * 8 * 2 / 2
        assert info["vs_baseline"] > 0 and info["first_call_s"] > 0


def test_the_attention_backward_family_times_the_fused_backward_against_torch(tmp_path):
    """``--families attention_backward``: each compiled backend's fused backward, and PyTorch's when installed."""
    path = tmp_path / "bw.json"
    run_cli("bench", *TINY, "--families", "attention_backward", "--no-plot", "--json", str(path), cwd=tmp_path)
    doc = json.loads(path.read_text())
    recs = doc["results"]
    assert recs and {r["family"] for r in recs} == {"attention_backward"}
    names = {r["contender"] for r in recs}
    if "numba" in fastattn.available_backends():
        assert "numba fused backward" in names
    for r in recs:
        assert r["check"] is None, r  # each agrees with the first contender's grad_query
        assert r["gflops"] > 0 and r["flop"] == pytest.approx(
            2.5 * 4 * r["seq_len"] ** 2 * 8 * 2 / (2 if r["causal"] else 1)
        )
