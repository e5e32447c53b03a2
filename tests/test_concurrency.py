"""Concurrency, fork and determinism, on every backend.

- 8 Python threads calling every public function at once get bitwise the results of serial calls: no crash, no
  deadlock (every join has a timeout), no state leaking between threads (``use_backend`` is per thread).
- Numba's threading layer: a thread-safe one is in use (``tbb`` or ``omp``; ``workqueue`` aborts the interpreter on
  concurrent use). What a user gets where no thread-safe layer can load is checked in a subprocess that hides them.
- fork: a process that forks after using fastattn either computes the right result in the child or raises an error
  that says to use the spawn start method, never hangs and never dies by a signal. Which one, per backend:

  ========  ===========================================================================================
  numpy     works in the child
  cython    works in the child, on one thread (GNU OpenMP cannot start a team in a forked child)
  numba     ``omp`` layer: unavailable in the child, ValueError naming the spawn start method; the automatic
            choice moves to the next backend with a RuntimeWarning. ``tbb`` / ``workqueue``: works.
  ========  ===========================================================================================

  The spawn start method works everywhere, and so does forking before the parent first ran a kernel.
- Determinism: same input, same thread count -> bitwise the same output, run after run and process after process;
  inputs are never modified (they are read-only here, so a write would raise) and outputs never alias inputs.

State that a test cannot undo (Numba's threading layer, forked children, hidden libraries) lives in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
from conftest import BACKENDS, COMPILED

import fastattn
from fastattn import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_THREADS = 8
JOIN_TIMEOUT = 300.0  # seconds; a deadlock fails the test instead of hanging the suite


def readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, dtype=np.float32, s=1.0):
        return readonly((rng.standard_normal(shape) * s).astype(dtype))

    params = fastattn.init_params(97, 48, 6, max_positions=80, seed=seed)
    pad = np.zeros((3, 70), bool)
    pad[1, 50:] = True
    mask = readonly(np.where(rng.random((3, 1, 70, 70)) > 0.3, 0.0, -np.inf).astype(np.float32))
    return dict(
        ids=readonly(rng.integers(0, 97, (3, 70))),
        table=r(97, 48),
        x=r(3, 70, 48),
        x64=r(3, 70, 48, dtype=np.float64),
        pe=r(80, 48),
        q=r(3, 6, 70, 16),
        k=r(3, 2, 70, 16),
        v=r(3, 2, 70, 8),
        mask=mask,
        bmask=readonly(rng.random((70, 70)) > 0.4),
        w=[r(48, 48, s=0.2) for _ in range(4)],
        w64=[r(48, 48, dtype=np.float64, s=0.2) for _ in range(4)],
        pad=readonly(pad),
        params=params,
    )


D = make_inputs()


def workloads(backend):
    """name -> zero-argument call: every public function that takes a backend, in several configurations."""
    sdpa = fastattn.scaled_dot_product_attention
    return {
        "embed": lambda: fastattn.embed(D["ids"], D["table"], backend=backend),
        "add_positions": lambda: fastattn.add_positions(D["x"], D["pe"], offset=5, backend=backend),
        "apply_rope": lambda: fastattn.apply_rope(D["q"], offset=3, interleaved=True, backend=backend),
        "sdpa-causal-gqa": lambda: sdpa(D["q"], D["k"], D["v"], is_causal=True, enable_gqa=True, backend=backend),
        "sdpa-float-mask": lambda: sdpa(D["q"][:, :2], D["k"], D["v"], D["mask"], backend=backend),
        "sdpa-bool-mask": lambda: sdpa(D["q"][:, :2], D["k"], D["v"], D["bmask"], backend=backend),
        "self_attention": lambda: fastattn.self_attention(
            D["x"], *D["w"], n_heads=6, key_padding_mask=D["pad"], rope=True, backend=backend
        ),
        "self_attention-gqa": lambda: fastattn.self_attention(
            D["x"],
            D["w"][0],
            D["w"][1][:, :16],
            D["w"][2][:, :16],
            D["w"][3],
            n_heads=6,
            n_kv_heads=2,
            backend=backend,
        ),
        "self_attention-f64-causal": lambda: fastattn.self_attention(
            D["x64"], *D["w64"], n_heads=4, is_causal=True, backend=backend
        ),
        "forward": lambda: fastattn.forward(
            D["ids"], D["params"], is_causal=True, key_padding_mask=D["pad"], backend=backend
        ),
    }


def serial_results(backend):
    return {name: call() for name, call in workloads(backend).items()}


def run_threads(target, n=N_THREADS):
    """Start n threads on target(i) behind a barrier; return their exceptions; fail on a thread that never ends."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    return errors


def numba_layer_is_threadsafe() -> bool:
    import numba

    return numba.threading_layer() in ("tbb", "omp")


def run_python(code: str, *, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` as a script file in a fresh interpreter (a file, so that spawned children can import it)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("NUMBA_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "script.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(code))
        return subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
        )


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ threads
def test_eight_threads_get_the_serial_results(backend):
    serial = serial_results(backend)
    if backend == "numba":
        assert numba_layer_is_threadsafe(), "Numba runs on a threading layer that aborts on concurrent use"
    calls = workloads(backend)
    names = sorted(calls)
    results = [dict() for _ in range(N_THREADS)]

    def work(i):
        for rnd in range(2):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # each thread in its own order
                results[i][(rnd, name)] = calls[name]()

    errors = run_threads(work)
    assert not errors, errors
    for i in range(N_THREADS):
        for (rnd, name), got in results[i].items():
            np.testing.assert_array_equal(got, serial[name], err_msg=f"thread {i}, round {rnd}: {name}")


def test_threads_on_different_backends_and_contexts():
    """Each thread picks its own backend with use_backend (a per-thread setting) and all run at once."""
    expected = {b: serial_results(b)["sdpa-causal-gqa"] for b in BACKENDS}
    seen = [None] * N_THREADS

    def work(i):
        name = BACKENDS[i % len(BACKENDS)]
        with fastattn.use_backend(name):
            for _ in range(3):
                assert _backends.resolve_name() == name
                out = workloads(None)["sdpa-causal-gqa"]()
                np.testing.assert_array_equal(out, expected[name])
        seen[i] = name

    errors = run_threads(work)
    assert not errors, errors
    assert _backends.resolve_name() == _backends.resolve_name(None)  # nothing leaked into this thread
    assert all(s is not None for s in seen)


def test_errors_in_some_threads_do_not_disturb_the_others(backend):
    """Half the threads send bad input at the same time as the other half compute."""
    good = serial_results(backend)["sdpa-causal-gqa"]
    call = workloads(backend)["sdpa-causal-gqa"]

    def work(i):
        for _ in range(3):
            if i % 2:
                with pytest.raises(IndexError):
                    fastattn.embed([97], D["table"], backend=backend)
                with pytest.raises(ValueError):
                    fastattn.scaled_dot_product_attention(D["q"], D["k"], D["v"], backend=backend)
            else:
                np.testing.assert_array_equal(call(), good)

    errors = run_threads(work)
    assert not errors, errors


@pytest.mark.parametrize("backend_", COMPILED)
def test_thread_count_applies_in_every_thread(backend_):
    """fastattn.set_num_threads is process-wide: a kernel launched from another Python thread uses that count too
    (Numba's own setting is per thread, so the backend has to carry it over)."""
    seen = []

    def work(i):
        workloads(backend_)["sdpa-causal-gqa"]()
        seen.append(_backends.kernels(backend_).get_num_threads())

    with fastattn.set_num_threads(1):
        errors = run_threads(work, n=2)
    assert not errors, errors
    assert seen == [1, 1], f"the {backend_} kernels ran on {seen} threads in worker threads, not 1"


# ------------------------------------------------------------------------------------------------ determinism
def test_bitwise_the_same_run_after_run(backend):
    first = serial_results(backend)
    for _ in range(3):
        for name, got in serial_results(backend).items():
            np.testing.assert_array_equal(got, first[name], err_msg=name)


@pytest.mark.parametrize("backend_", COMPILED)
def test_bitwise_the_same_for_every_thread_count(backend_):
    """Each output row is computed by one thread in a fixed order, so the thread count changes nothing."""
    with fastattn.set_num_threads(1):
        one = serial_results(backend_)
    for n in range(2, fastattn.get_num_threads() + 1):
        with fastattn.set_num_threads(n):
            for name, got in serial_results(backend_).items():
                np.testing.assert_array_equal(got, one[name], err_msg=f"{name} with {n} threads")


def _digest(results: dict) -> dict:
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in results.items()}


def test_bitwise_the_same_in_another_process():
    """Two fresh processes, same inputs and thread counts: bitwise the same results. (Fresh processes on both sides:
    this test process may have changed NumPy's BLAS thread count, which changes the projections' rounding.)"""
    code = """
        import json, os, sys, warnings
        warnings.simplefilter("ignore")
        sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
        import fastattn, test_concurrency as t
        print(json.dumps({b: t._digest(t.serial_results(b)) for b in fastattn.available_backends()}))
        """
    first, second = last_json(run_python(code)), last_json(run_python(code))
    for backend in BACKENDS:
        assert first[backend] == second[backend], backend


def test_inputs_untouched_outputs_fresh(backend):
    """Read-only inputs (a write raises), unchanged afterwards; outputs writeable, sharing memory with no input and
    not with the output of another call."""
    inputs = [a for a in D.values() if isinstance(a, np.ndarray)] + D["w"] + D["w64"]
    inputs += [getattr(D["params"], f) for f in ("embedding", "positions", "w_q", "w_k", "w_v", "w_o")]
    copies = [a.copy() for a in inputs]
    first = serial_results(backend)
    second = serial_results(backend)
    for a, c in zip(inputs, copies, strict=True):
        np.testing.assert_array_equal(a, c)
    for name, out in first.items():
        assert out.flags.writeable, name
        assert not np.shares_memory(out, second[name]), name
        for a in inputs:
            assert not np.shares_memory(out, a), name


# ------------------------------------------------------------------------------------------------ threading layer
@pytest.mark.skipif("numba" not in BACKENDS, reason="the numba backend is not available here")
def test_numba_threading_layer_in_a_fresh_process():
    """A fresh process picks a thread-safe layer before the first parallel launch (tbb, else omp)."""
    proc = run_python(
        """
        import json, numpy as np, fastattn, numba
        q = np.ones((1, 2, 3, 4), np.float32)
        fastattn.scaled_dot_product_attention(q, q, q, backend="numba")
        print(json.dumps(numba.threading_layer()))
        """
    )
    assert last_json(proc) in ("tbb", "omp")


HIDE_THREADSAFE_LAYERS = """
    import sys
    sys.modules["numba.np.ufunc.tbbpool"] = None  # as on a machine without TBB ...
    sys.modules["numba.np.ufunc.omppool"] = None  # ... and without an OpenMP runtime Numba can load
"""


@pytest.mark.skipif("numba" not in BACKENDS, reason="the numba backend is not available here")
def test_numba_without_a_threadsafe_layer_never_aborts():
    """Where neither TBB nor OpenMP loads, Numba would fall back to 'workqueue', which aborts the interpreter when two
    threads launch at once. fastattn must instead serialise the launches (right results) or raise a Python error
    that names the threading layer: never a dead process."""
    proc = run_python(
        HIDE_THREADSAFE_LAYERS
        + """
    import json, threading, numpy as np, fastattn
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 150, 32)).astype(np.float32) for _ in range(3))
    outcome = {"ok": 0, "errors": []}
    try:
        ref = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba")
    except Exception as exc:
        ref = None
        outcome["errors"].append(f"{type(exc).__name__}: {exc}")
    barrier = threading.Barrier(8)
    matches = []
    def work():
        barrier.wait()
        for _ in range(10):
            try:
                out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba")
                matches.append(bool(ref is not None and np.array_equal(out, ref)))  # append is atomic; += is not
            except Exception as exc:
                outcome["errors"].append(f"{type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    outcome["ok"] = sum(matches)
    import numba
    try:
        outcome["layer"] = numba.threading_layer()
    except ValueError as exc:
        outcome["layer"] = str(exc)
    print(json.dumps(outcome))
    """
    )
    assert proc.returncode >= 0, f"the interpreter died by signal {-proc.returncode}:\n{proc.stderr[-2000:]}"
    outcome = last_json(proc)
    if outcome["errors"]:
        assert all("threading layer" in e.lower() for e in outcome["errors"]), outcome["errors"][:3]
    else:
        assert outcome["ok"] == 80, outcome


# ------------------------------------------------------------------------------------------------ fork
FORK_SCRIPT = """
    import json, multiprocessing as mp, sys, warnings
    import numpy as np
    import fastattn

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 130, 16)).astype(np.float32) for _ in range(3))

    def attend(backend):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)

    def child(conn, backend, ref):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = attend(backend)
                conn.send({"outcome": "ok" if np.allclose(out, ref, rtol=1e-5, atol=1e-6) else "WRONG",
                           "warnings": [str(w.message) for w in caught]})
            except Exception as exc:
                conn.send({"outcome": "error", "message": f"{type(exc).__name__}: {exc}"})

    def run_child(method, backend, ref):
        ctx = mp.get_context(method)
        here, there = ctx.Pipe()
        p = ctx.Process(target=child, args=(there, backend, ref))
        p.start()
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
            return {"outcome": "HUNG"}
        if p.exitcode != 0:
            return {"outcome": f"DIED with exit code {p.exitcode}"}
        return here.recv()

    if __name__ == "__main__":
        backends = fastattn.available_backends()
        ref = {b: attend(b) for b in backends}  # the parent uses every backend first
        result = {"layer": None}
        if "numba" in backends:
            import numba
            result["layer"] = numba.threading_layer()
        for b in backends:
            result[f"fork/{b}"] = run_child("fork", b, ref[b])
            result[f"spawn/{b}"] = run_child("spawn", b, ref[b])
        result["fork/automatic"] = run_child("fork", None, ref[backends[0]])
        print(json.dumps(result))
"""


def test_fork_after_use():
    """Each backend in a child forked after the parent used all of them, and in a spawned child."""
    proc = run_python(FORK_SCRIPT, timeout=600)
    result = last_json(proc)
    for key, got in result.items():
        if key == "layer":
            continue
        assert got["outcome"] in ("ok", "error"), f"{key}: {got}"  # not HUNG, DIED or WRONG
        if got["outcome"] == "error":
            assert key.startswith("fork/") and "spawn" in got["message"], f"{key}: {got}"
    for b in BACKENDS:
        assert result[f"spawn/{b}"]["outcome"] == "ok", b
    # the documented outcome per backend (module docstring)
    assert result["fork/numpy"]["outcome"] == "ok"
    if "cython" in BACKENDS:
        assert result["fork/cython"]["outcome"] == "ok"
    if "numba" in BACKENDS:
        fork_safe_layer = result["layer"] in ("tbb", "workqueue")
        assert result["fork/numba"]["outcome"] == ("ok" if fork_safe_layer else "error"), result["fork/numba"]
        if not fork_safe_layer:
            assert "multiprocessing.get_context('spawn')" in result["fork/numba"]["message"]
    automatic = result["fork/automatic"]
    assert automatic["outcome"] == "ok"
    if result.get("fork/numba", {}).get("outcome") == "error" and BACKENDS[0] == "numba":
        assert any("spawn" in w for w in automatic["warnings"]), automatic  # told why it is not numba


def test_fork_before_first_use():
    """Forking after import but before any kernel ran: the child starts its own threads and works."""
    proc = run_python(
        """
        import json, multiprocessing as mp, numpy as np, fastattn
        def child(conn):
            q = np.ones((1, 2, 70, 8), np.float32)
            conn.send({b: float(fastattn.scaled_dot_product_attention(q, q, q, backend=b).sum())
                       for b in fastattn.available_backends()})
        if __name__ == "__main__":
            fastattn.warmup(backends=["numpy"])
            ctx = mp.get_context("fork")
            here, there = ctx.Pipe()
            p = ctx.Process(target=child, args=(there,))
            p.start()
            p.join(240)
            alive = p.is_alive()
            if alive:
                p.kill()
            print(json.dumps({"alive": alive, "exitcode": p.exitcode, "sums": here.recv() if here.poll() else None}))
        """
    )
    result = last_json(proc)
    assert not result["alive"] and result["exitcode"] == 0, result
    assert set(result["sums"]) == set(BACKENDS)
    for b, total in result["sums"].items():
        assert total == pytest.approx(1 * 2 * 70 * 8), b
