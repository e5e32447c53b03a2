"""Large inputs: the fused kernels' memory grows with N, not N², and their index arithmetic is 64-bit.

Peak memory is measured in a fresh subprocess (Linux: the kernel's peak-RSS counter, reset just before the call) at
N = 16384 tokens, where one N x N float32 score matrix would be 1 GiB: the call may add only a few MiB beyond its
inputs and output (the backward, at most 64 MiB beyond its inputs and gradients). The compiled backends only: the
numpy backend is the literal oracle and builds the N x N matrix on purpose.

64-bit indices: a fused call over L = S = 2^16 + 1 (L·S > 2^32) whose broadcast mask and key bias are read at row
~65536, column ~0..3: a flat index ``i * S + j`` computed in 32 bits would wrap there. A causal offset of -(L - 3)
leaves keys to the last three rows only, so the call is cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKWARD_BACKENDS, COMPILED

from fastattn import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16384
MIB = 1 << 20
LIMIT_MIB = 64  # allowed growth of the peak RSS during one call at N = 16384 (the N x N float32 matrix: 1024 MiB)

PEAK_SCRIPT = """
    import json, os, sys, threading, time, warnings
    import numpy as np
    import fastattn

    warnings.simplefilter("ignore")
    backend, N = sys.argv[1], int(sys.argv[2])

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def peak_during(call):
        # bytes by which the peak resident size rises during call()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = status("VmHWM")
            call()
            return status("VmHWM") - before
        except OSError:  # no clear_refs here: sample the RSS instead
            before, top, done = status("VmRSS"), [0], []
            def sample():
                while not done:
                    top[0] = max(top[0], status("VmRSS"))
                    time.sleep(0.001)
            t = threading.Thread(target=sample)
            t.start()
            call()
            done.append(1)
            t.join()
            return max(top[0], status("VmRSS")) - before

    rng = np.random.default_rng(0)
    sdpa = fastattn.scaled_dot_product_attention
    cases = {
        "causal-gqa": lambda n: [rng.standard_normal((1, h, n, 64)).astype(np.float32) for h in (2, 1, 1)],
        "key-mask": lambda n: [rng.standard_normal((1, 1, n, 64)).astype(np.float32) for _ in range(3)],
    }
    result = {}
    for name, make in cases.items():
        kw = dict(is_causal=True, enable_gqa=True) if name == "causal-gqa" else {}
        def run(n, make=make, kw=kw, name=name):
            q, k, v = make(n)
            mask = (np.arange(n) % 7 != 3)[None, :] if name == "key-mask" else None
            out = []
            grew = peak_during(lambda: out.append(sdpa(q, k, v, mask, backend=backend, **kw)))
            assert np.all(np.isfinite(out[0]))
            return grew - out[0].nbytes  # the output itself is expected
        run(100)  # compile (or load) the kernels first
        result[name] = {n: run(n) for n in (N // 4, N)}
    print(json.dumps(result))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux only)")
@pytest.mark.parametrize("backend_", COMPILED)
def test_fused_attention_memory_grows_with_n_not_n_squared(backend_, tmp_path):
    _assert_peak_growth_bounded(PEAK_SCRIPT, backend_, tmp_path, timeout=600)


def _assert_peak_growth_bounded(script_text, backend_, tmp_path, *, timeout):
    """Run ``script_text`` in a fresh 2-thread process; each case's peak RSS growth at N must stay within the limit."""
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(script_text))
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, str(script), backend_, str(N)], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, by_n in result.items():
        grew = {int(n): b / MIB for n, b in by_n.items()}
        assert grew[N] <= LIMIT_MIB, f"{name}: the peak RSS grew by {grew[N]:.1f} MiB at N={N} ({grew})"


BACKWARD_PEAK_SCRIPT = (
    PEAK_SCRIPT.split("    rng = np.random")[0]
    + """
    rng = np.random.default_rng(0)
    sdpa = fastattn.scaled_dot_product_attention
    sdpa_backward = fastattn.scaled_dot_product_attention_backward
    cases = {
        "causal-gqa": lambda n: [rng.standard_normal((1, h, n, 64)).astype(np.float32) for h in (2, 1, 1)],
        "key-mask": lambda n: [rng.standard_normal((1, 1, n, 64)).astype(np.float32) for _ in range(3)],
    }
    result = {}
    for name, make in cases.items():
        kw = dict(is_causal=True, enable_gqa=True) if name == "causal-gqa" else {}
        def run(n, make=make, kw=kw, name=name):
            q, k, v = make(n)
            mask = (np.arange(n) % 7 != 3)[None, :] if name == "key-mask" else None
            out, lse = sdpa(q, k, v, mask, return_lse=True, backend=backend, **kw)
            grad = np.ones_like(out)
            grads = []
            grew = peak_during(lambda: grads.extend(sdpa_backward(grad, q, k, v, out, lse, mask, backend=backend,
                                                                  **kw)))
            assert all(np.all(np.isfinite(g)) for g in grads)
            return grew - sum(g.nbytes for g in grads)  # the gradients themselves are expected
        run(100)  # compile (or load) the kernels first
        result[name] = {n: run(n) for n in (N // 4, N)}
    print(json.dumps(result))
"""
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux only)")
@pytest.mark.parametrize("backend_", [b for b in BACKWARD_BACKENDS if b != "numpy"])
def test_fused_attention_backward_memory_grows_with_n_not_n_squared(backend_, tmp_path):
    _assert_peak_growth_bounded(BACKWARD_PEAK_SCRIPT, backend_, tmp_path, timeout=900)


@pytest.mark.parametrize("backend_", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_attention_index_arithmetic_is_64_bit(backend_, dtype):
    L = S = (1 << 16) + 1  # L * S > 2**32
    offset = -(L - 3)  # query i sees keys j <= i + offset: only rows L-3, L-2, L-1 see anything (1, 2, 3 keys)
    j = np.arange(S)
    q = np.zeros((1, 2, L, 1), dtype)  # equal scores: each row is the mean of the values it sees
    k = np.zeros((1, 1, S, 1), dtype)
    v = np.stack([1 + j % 11, 2 + 2 * (j % 5)], axis=-1).astype(dtype)[None, None]  # (1, 1, S, 2), no zero row
    row = np.zeros(S, dtype)
    row[1] = -np.inf  # hides key 1 through the mask (read at rows ~65536: flat index ~2^32 + 1)
    mask = np.broadcast_to(row, (1, 2, L, S))
    key_bias = np.zeros((1, S), dtype)
    key_bias[0, 2] = np.log(3.0)  # key 2 weighs 3 (through the key bias)
    out = np.full((1, 2, L, 2), np.nan, dtype)
    lse = np.empty((1, 2, L), dtype)
    _backends.kernels(backend_).attention(out, lse, q, k, v, 1.0, True, offset, 0, mask, True, key_bias, True)
    np.testing.assert_array_equal(out[:, :, : L - 3], 0.0)  # rows with no visible key
    expected = np.array(
        [
            v[0, 0, 0],  # row L-3 sees key 0
            v[0, 0, 0],  # row L-2 sees keys 0, 1; key 1 is masked
            (v[0, 0, 0] + 3 * v[0, 0, 2]) / 4,  # row L-1 sees keys 0, 1, 2
        ]
    )
    for h in range(2):
        np.testing.assert_allclose(out[0, h, L - 3 :], expected, rtol=1e-6)
