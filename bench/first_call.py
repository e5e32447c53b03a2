"""First call in a fresh process, ``import fastattn`` included, with a warm on-disk cache (issue 12's yardstick).

    python bench/first_call.py [--runs 3] [--backends numba,cython] [--variants plain,causal,mask,embed] [--json F]

Each sample is a new ``python -c`` process: NumPy is imported and the inputs are made first (not timed), then the
clock runs from before ``import fastattn`` to after the first ``scaled_dot_product_attention`` (float32 q, k, v of
shape (1, 12, 1024, 64); "causal": ``is_causal=True``; "mask": a float (1024, 1024) mask) or ``embed`` (4 x 128 ids
into a (1000, 64) table) returns. One unrecorded process per case runs first, so that Numba's cache is warm. Printed
per case: the median, min and max over the runs, and whether the process had imported ``scipy.linalg``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import sys, time
import numpy as np
backend, variant = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 12, 1024, 64), dtype=np.float32) for _ in range(3))
mask = np.zeros((1024, 1024), np.float32)
mask[:, :10] = -np.inf
table = rng.standard_normal((1000, 64), dtype=np.float32)
ids = rng.integers(0, 1000, (4, 128))
t0 = time.perf_counter()
import fastattn
if variant == "embed":
    fastattn.embed(ids, table, backend=backend)
else:
    fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=variant == "causal", attn_mask=mask if variant == "mask" else None, backend=backend
    )
print(time.perf_counter() - t0, "scipy.linalg" in sys.modules)
"""

VARIANTS = ("plain", "causal", "mask", "embed")


def sample(backend: str, variant: str) -> tuple[float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, backend, variant], capture_output=True, text=True, timeout=600, check=True
    )
    seconds, linalg = out.stdout.split()
    return float(seconds), linalg == "True"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed processes per case (default 3)")
    parser.add_argument("--backends", default="numba,cython")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the samples to this file")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if bad := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"--variants must be among {', '.join(VARIANTS)}, got {', '.join(bad)}")
    results = []
    print(f"{'backend':<8} {'variant':<7} {'median':>8} {'min':>8} {'max':>8}  scipy.linalg imported")
    for backend in args.backends.split(","):
        for variant in variants:
            sample(backend, variant)  # warms the cache
            runs = [sample(backend, variant) for _ in range(args.runs)]
            seconds = [s for s, _ in runs]
            linalg = any(flag for _, flag in runs)
            results.append({"backend": backend, "variant": variant, "seconds": seconds, "scipy_linalg": linalg})
            print(
                f"{backend:<8} {variant:<7} {statistics.median(seconds):>7.3f}s {min(seconds):>7.3f}s "
                f"{max(seconds):>7.3f}s  {'yes' if linalg else 'no'}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.executable, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
