"""Per-machine plans (fastattn._plans): built-in defaults, the cache ``python -m fastattn tune`` writes, how a bad
cache is ignored, what ``fastattn.plan_info()`` reports, and that the automatic backend follows the measurement.

That a plan never changes results beyond rounding is the oracle suites' job: tests/test_backends.py and
tests/test_properties.py run under forced odd plans (the ``@7x13`` / ``@64x96`` variants of tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COMPILED, check_against_oracle

import fastattn
from fastattn import _backends, _plans, oracle

NEEDS_BOTH = pytest.mark.skipif(not {"numba", "cython"} <= set(COMPILED), reason="needs both compiled backends")
NEEDS_NUMBA = pytest.mark.skipif("numba" not in COMPILED, reason="needs the numba backend")


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    """A fresh cache path for the test (FASTATTN_PLAN_CACHE); the suite's own afterwards."""
    for name in COMPILED:
        _backends.kernels(name)  # loaded: refresh_plans reconfigures them
    path = tmp_path / "plans.json"
    monkeypatch.setenv("FASTATTN_PLAN_CACHE", str(path))
    monkeypatch.delenv("FASTATTN_TILES", raising=False)
    _backends.refresh_plans()
    yield path
    monkeypatch.undo()
    _backends.refresh_plans()


def _entry(threads, dtype="float32", head_dim=16, faster="cython", numba=("loops", 7, 13), cython=("micro", 64, 96)):
    plans = {}
    for name, p in (("numba", numba), ("cython", cython)):
        plans[name] = {"tiles": p[0], "block_q": p[1], "block_k": p[2]}
    return {"date": "2026-01-02 03:04 UTC", "plans": plans, "faster": faster, "speedup": 1.5}


def _write(path, entries, version=_plans.CACHE_VERSION):
    path.write_text(json.dumps({"version": version, "entries": entries}))
    _backends.refresh_plans()


def _attention_ok(backend, head_dim=16):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 40, head_dim)).astype(np.float32) for _ in range(3))
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    check_against_oracle(got, lambda a, b, c: oracle.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v))


def test_builtin_plans_without_cache(plan_cache):
    info = fastattn.plan_info()
    assert info["cache"] == str(plan_cache)
    assert info["cache_status"].startswith("no cache file")
    assert info["machine"]["cpu"] and info["machine"]["threads"] == fastattn.get_num_threads()
    family = _plans.FAMILY_NAMES[_plans.cpu_family()]
    for name in COMPILED:
        plan = info["backends"][name]
        assert plan["source"].startswith(f"built-in default for {family}")
        assert (plan["tiles"], plan["block_q"], plan["block_k"]) == _plans.builtin_plan(name).as_tuple()
        assert plan["per_shape"] == {}
    assert info["automatic"] == fastattn.available_backends()[0]
    assert "nothing measured on this machine" in info["why"]


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "JSONDecodeError"),
        (json.dumps({"version": 999, "entries": {}}), "format version 999"),
        (json.dumps([1, 2]), "not a JSON object"),
        (
            json.dumps(
                {
                    "version": _plans.CACHE_VERSION,
                    "entries": {"k": {"plans": {"numba": {"tiles": "micro", "block_q": 0, "block_k": 8}}}},
                }
            ),
            "no valid 'plans'",
        ),  # fmt: skip
        (json.dumps({"version": _plans.CACHE_VERSION, "entries": {"k": {"plans": {}, "faster": "torch"}}}), "faster"),
        (b"\xff\xfe\x00garbage", "Decode"),
    ],
)
def test_bad_cache_is_ignored_with_a_warning(plan_cache, content, why):
    if isinstance(content, bytes):
        plan_cache.write_bytes(content)
    else:
        plan_cache.write_text(content)
    with pytest.warns(RuntimeWarning, match=f"plan cache {plan_cache}.*ignored.*{why}"):
        _backends.refresh_plans()  # reconfigures the loaded backends: reads the cache
        info = fastattn.plan_info()
    assert info["cache_status"].startswith("ignored")
    for name in COMPILED:
        assert info["backends"][name]["source"].startswith("built-in default")
        _attention_ok(name)  # still runs, right
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattn.plan_info()  # warned once per process and path, not at every call


def test_unreadable_cache_is_ignored(plan_cache):
    plan_cache.mkdir()  # a folder where the file should be: open() fails
    with pytest.warns(RuntimeWarning, match="ignored"):
        _backends.refresh_plans()
        info = fastattn.plan_info()
    assert "using the built-in defaults" in info["cache_status"]


@NEEDS_BOTH
def test_cached_plans_are_used_and_reported(plan_cache):
    threads = fastattn.get_num_threads()
    _write(plan_cache, {_plans.entry_key(threads, "float32", 16): _entry(threads)})
    info = fastattn.plan_info()
    assert info["cache_status"] == "read, 1 entries"
    numba, cython = info["backends"]["numba"], info["backends"]["cython"]
    assert (numba["tiles"], numba["block_q"], numba["block_k"]) == ("loops", 7, 13)
    assert numba["source"] == "tuned 2026-01-02 03:04 UTC (float32, d=16)"
    assert numba["per_shape"] == {"float32 d=16": "loops tiles 7x13 (tuned 2026-01-02 03:04 UTC)"}
    assert (cython["tiles"], cython["block_q"], cython["block_k"]) == ("micro", 64, 96)
    # the backends run them: numba per call, cython for the process
    from fastattn.kernels import cython as cy
    from fastattn.kernels.numba import _config

    assert _config.plan_for(np.dtype(np.float32), 16) == ("loops", 7, 13)
    assert cy.build("_attention")._set_tiles("micro", 64, 96) == (64, 96)
    assert cy.tile_products().startswith("micro")
    # the automatic choice follows the measurement, and says so
    assert info["automatic"] == "cython"
    assert info["why"].startswith("cython: measured faster on this machine by `fastattn tune` at 2026-01-02")
    assert _backends.resolve_name() == "cython"
    for name in COMPILED:
        _attention_ok(name)


@NEEDS_BOTH
def test_measurement_of_another_thread_count_or_machine_is_not_used(plan_cache):
    threads = fastattn.get_num_threads()
    other = _plans.entry_key(threads + 1, "float32", 16)
    _write(plan_cache, {other: _entry(threads + 1), "Some Other CPU|avx2|2|float32|16": _entry(2)})
    info = fastattn.plan_info()
    assert info["cache_status"] == "read, 2 entries"
    for name in COMPILED:
        assert info["backends"][name]["source"].startswith("built-in default")
    assert info["automatic"] == fastattn.available_backends()[0]


@NEEDS_NUMBA
def test_tiles_setting_overrides_the_plan(plan_cache, monkeypatch):
    threads = fastattn.get_num_threads()
    _write(plan_cache, {_plans.entry_key(threads, "float32", 16): _entry(threads, numba=("micro", 7, 13))})
    monkeypatch.setenv("FASTATTN_TILES", "loops")
    _backends.refresh_plans()
    numba = fastattn.plan_info()["backends"]["numba"]
    assert numba["tiles"] == "loops" and numba["source"].startswith("FASTATTN_TILES=loops; built-in default")
    from fastattn.kernels.numba import _config

    assert _config.plan_for(np.dtype(np.float32), 16)[0] == "loops"


@NEEDS_NUMBA
def test_thread_count_change_switches_plan(plan_cache):
    _write(plan_cache, {_plans.entry_key(1, "float32", 16): _entry(1, numba=("micro", 7, 13))})
    from fastattn.kernels.numba import _config

    with fastattn.set_num_threads(1):
        assert _config.plan_for(np.dtype(np.float32), 16) == ("micro", 7, 13)
        assert fastattn.plan_info()["backends"]["numba"]["source"].startswith("tuned")
        _attention_ok("numba")
    if fastattn.get_num_threads() != 1:
        assert _config.plan_for(np.dtype(np.float32), 16) == _plans.builtin_plan("numba").as_tuple()


def test_tune_quick_writes_the_cache_and_the_plans_are_used(plan_cache, capsys):
    """CI runs the tuner on a tiny grid into a temporary cache, then checks the plan is used and reported."""
    from fastattn.__main__ import main
    from fastattn.tools import tune

    if not COMPILED:
        assert main(["tune", "--quick", "--quiet"]) == 1
        return
    argv = ["tune", "--quick", "--quiet", "--n", "24", "--heads", "1", "--rounds", "2", "--head-dims", "8"]
    assert main(argv + ["--cache", str(plan_cache)]) == 0
    out = capsys.readouterr().out
    assert f"stored 1 plan(s) in {plan_cache}" in out
    m = _plans.machine()
    assert out.startswith(f"fastattn tune on {m['cpu']} ({m['family']}, {m['isa']})")
    doc = json.loads(plan_cache.read_text())
    key = _plans.entry_key(fastattn.get_num_threads(), "float32", 8)
    assert doc["version"] == _plans.CACHE_VERSION and list(doc["entries"]) == [key]
    entry = doc["entries"][key]
    info = fastattn.plan_info()
    for name in COMPILED:
        stored = entry["plans"][name]
        plan = info["backends"][name]
        fields = ("tiles", "block_q", "block_k")
        assert [plan[f] for f in fields] == [stored[f] for f in fields]
        assert plan["source"] == f"tuned {entry['date']} (float32, d=8)"
        assert stored["tiles"] == "micro" and (stored["block_q"], stored["block_k"]) in (
            (16, 32), (32, 64), _plans.builtin_plan(name).as_tuple()[1:]
        )  # fmt: skip
        _attention_ok(name, head_dim=8)
    if len(COMPILED) == 2 and entry["speedup"] >= 1 + tune.TIE:
        assert entry["faster"] in COMPILED
        assert info["automatic"] == entry["faster"]
        assert info["why"].startswith(f"{entry['faster']}: measured faster on this machine by `fastattn tune`")
    else:  # one backend, or a tie: nothing recorded, the preference order stands
        assert entry["faster"] is None
        assert info["automatic"] == fastattn.available_backends()[0]


def test_tune_rejects_bad_arguments():
    from fastattn.__main__ import main

    with pytest.raises(SystemExit, match="--head-dims must be"):
        main(["tune", "--head-dims", "sixty"])
    with pytest.raises(SystemExit, match="--dtypes takes"):
        main(["tune", "--dtypes", "float16"])
    with pytest.raises(SystemExit, match="not an available compiled backend"):
        main(["tune", "--backends", "numpy"])


def test_cache_path_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTATTN_PLAN_CACHE", str(tmp_path / "x.json"))
    assert _plans.cache_path() == str(tmp_path / "x.json")
    monkeypatch.delenv("FASTATTN_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _plans.cache_path() == str(tmp_path / "fastattn" / "plans.json")


def test_store_merges_and_validates(plan_cache):
    threads = fastattn.get_num_threads()
    a, b = _plans.entry_key(threads, "float32", 16), _plans.entry_key(threads, "float64", 16)
    _plans.store({a: _entry(threads)})
    _plans.store({b: _entry(threads, dtype="float64")})
    assert sorted(json.loads(plan_cache.read_text())["entries"]) == sorted([a, b])
    with pytest.raises(ValueError, match="no valid 'plans'"):
        _plans.store({a: {"plans": {"numba": {"tiles": "fast", "block_q": 1, "block_k": 1}}}})


@NEEDS_NUMBA
@pytest.mark.parametrize("others, kept", [(0.99, True), (0.9, False)])
def test_tune_keeps_the_builtin_plan_within_the_tie_margin(monkeypatch, others, kept):
    """A candidate less than TIE (3 %) faster than the built-in plan is noise: the built-in plan stays."""
    from fastattn.tools import timing, tune

    builtin = _plans.builtin_plan("numba").as_tuple()

    def fake_run(contenders, **kwargs):  # the built-in plan takes 1.0 s, every other candidate `others`
        for c in contenders:
            c.samples, c.error = [1.0 if c.info["plan"] == builtin else others], None
        return contenders

    monkeypatch.setattr(timing, "run_interleaved", fake_run)
    found = tune.measure(["numba"], "float32", 8, fastattn.get_num_threads(), n=8, heads=1, rounds=1, quick=True,
                         blas=False)  # fmt: skip
    best = found["numba"][0]
    assert ((best["tiles"], best["block_q"], best["block_k"]) == builtin) == kept
