"""The embedding gather against a plain copy of the same bytes, side by side in one process (issue 12's yardstick).

    python bench/gather_vs_copy.py [--ids 65536] [--vocab 50257] [--dim 768] [--threads 2] [--rounds 15]

Every contender writes into a preallocated output (no page faults timed): ``np.copyto`` of a (T, D) array (the
plain copy), ``np.take(..., out=)``, ``fastattn.embed(..., out=)`` per backend (validation included) and the raw
gather kernel. Rates count the bytes read plus written (2 · T · D · itemsize) per second. Samples are interleaved
(one of each per round, order rotated), medians reported, with the CPU, ISA and thread count of the run.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import fastattn
from fastattn import _backends, _plans
from fastattn.tools import timing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=65536)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.vocab, args.dim)).astype(args.dtype)
    ids = rng.integers(0, args.vocab, args.ids)
    out = np.empty((args.ids, args.dim), args.dtype)
    out.fill(0)  # touched: no page faults in the timed calls
    src = table[ids]  # the same bytes, contiguous
    dst = np.zeros_like(src)
    nbytes = 2 * out.nbytes

    contenders = [
        timing.Contender("np.copyto (plain copy)", lambda: np.copyto(dst, src)),
        timing.Contender("np.take(out=)", lambda: np.take(table, ids, axis=0, out=out)),
    ]
    for name in fastattn.available_backends():
        if name == "numpy":
            continue
        kern = _backends.kernels(name)
        contenders.append(timing.Contender(f"{name} embed(out=)", lambda n=name: fastattn.embed(ids, table, out=out,
                                                                                               backend=n)))  # fmt: skip
        contenders.append(timing.Contender(f"{name} gather kernel", lambda k=kern: k.gather(out, ids, table)))
    with timing.pin_threads(args.threads):
        threads = fastattn.get_num_threads()
        timing.run_interleaved(contenders, rounds=args.rounds, budget_s=5.0)
    m = _plans.machine()
    print(f"gather of {args.ids} ids from a {args.vocab} x {args.dim} {args.dtype} table ({out.nbytes / 1e6:.0f} MB "
          f"out) on {m['cpu']} ({m['isa']}), {threads} threads; interleaved, median of {args.rounds} rounds; "
          f"rate = (read + write) bytes / s")  # fmt: skip
    copy = contenders[0].stats().median
    rows = []
    for c in contenders:
        if not c.ok:
            print(f"  {c.name:24s} failed: {c.error}")
            continue
        s = c.stats()
        rate = nbytes / s.median / 1e9
        rows.append({"name": c.name, "median_s": s.median, "gb_s": rate, "of_copy": copy / s.median})
        print(f"  {c.name:24s} {timing.format_seconds(s.median):>10s}  {rate:6.1f} GB/s  {copy / s.median:6.1%} of "
              f"the copy rate  (spread {s.spread:.0%})")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": timing.machine_info(), "threads": threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
