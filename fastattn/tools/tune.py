"""``python -m fastattn tune``: choose this machine's plans of the fused attention by measuring them.

For each compiled backend, each dtype, head width and thread count asked for, the candidate plans (tile products x
tile shape, query rows x keys) run side by side, interleaved (one sample of each per round, the order rotated), on a
full and a causal attention; a candidate's score is the sum of its two medians. The fastest candidate of each
backend is its plan, unless the built-in plan is within ``TIE`` (3 %) of it: then the built-in one is kept (a shape
that wins by less is noise on a busy machine). The backend whose plan is faster by more than ``TIE`` is recorded as
the faster one, which the automatic backend choice then follows (``fastattn.plan_info()`` says so). Winners go to
the plan cache (``FASTATTN_PLAN_CACHE``, default ``~/.cache/fastattn/plans.json``), keyed by CPU model, ISA, thread
count, dtype and head width.

Every candidate's first result is compared with the backend's built-in plan (a plan never changes results beyond
rounding); one that differs more is dropped and reported. The full grid (16 shapes per backend) took 23-34 s on 2
busy cores; ``--quick`` is a tiny grid on small inputs (seconds; the plans it finds only check the machinery).
"""

from __future__ import annotations

import datetime
import json
import sys

HELP = "measure tile shapes and tile products of the compiled backends on this machine and store the fastest"

_FULL_Q = (64, 128, 192, 256)
_FULL_K = (128, 256, 384, 512)
_QUICK = ((16, 32), (32, 64))
_STORED = ("tiles", "block_q", "block_k", "score_s")
#: A backend less than this much faster than the other is a tie (noise on a busy machine): no "faster" is recorded;
#: a candidate plan less than this much faster than the built-in one does not replace it.
TIE = 0.03


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny grid on small inputs (seconds; for checks)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes (default float32)")
    parser.add_argument("--head-dims", default="64", help="comma-separated head widths (default 64)")
    parser.add_argument(
        "--threads", default=None, help="comma-separated thread counts (default: the current count, all cores)"
    )
    parser.add_argument("--backends", default=None, help="comma-separated compiled backends (default: available)")
    parser.add_argument("--n", type=int, default=None, help="sequence length measured (default 1024; quick 64)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default 12; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; quick 3)")
    parser.add_argument("--blas", action="store_true", help="also try the BLAS tile products (usually slower)")
    parser.add_argument("--cache", default=None, metavar="FILE", help="plan cache to write (default: the setting)")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, store nothing")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"fastattn tune: {what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"fastattn tune: {what} must be integers >= 1, got {text!r}")
    return values


def candidates(backend: str, quick: bool, blas: bool) -> list[tuple[str, int, int]]:
    """The plans measured for ``backend``: (tile products, query rows, keys), the built-in one included."""
    from fastattn import _plans

    shapes = list(_QUICK) if quick else [(bq, bk) for bq in _FULL_Q for bk in _FULL_K]
    found = [("micro", bq, bk) for bq, bk in shapes]
    if blas:
        found += [("blas", bq, bk) for bq, bk in shapes if bk >= 256 or quick]
    builtin = _plans.builtin_plan(backend).as_tuple()
    if builtin not in found:
        found.append(builtin)
    return found


def _setter(backend: str, kern):
    """A function that makes ``plan`` the backend's plan for every call."""
    if backend == "numba":
        from fastattn.kernels.numba import _config

        def set_plan(plan):
            _config.configure(tiles=plan[0], block_q=plan[1], block_k=plan[2])

        return set_plan
    from fastattn.kernels import cython

    ext = cython.build("_attention")

    def set_plan(plan):
        ext._set_tile_products(plan[0])
        ext._set_tiles(plan[0], plan[1], plan[2])

    return set_plan


def measure(backends, dtype, head_dim, threads, *, n, heads, rounds, quick, blas, progress=None) -> dict:
    """Time every candidate plan of every backend for one (dtype, head width, threads), full and causal, all in one
    interleaved run (so that the backends are compared side by side too). Returns backend -> results, fastest first.
    """
    import numpy as np

    import fastattn
    from fastattn import _backends, _call, _plans

    from . import timing

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, n, head_dim)).astype(dtype) for _ in range(3))
    scale = _call.default_scale(head_dim)
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    contenders, plans = [], {}
    with fastattn.set_num_threads(threads):
        for backend in backends:
            kern = _backends.kernels(backend)
            set_plan = _setter(backend, kern)
            reference = {}
            for causal in (False, True):
                set_plan(_plans.builtin_plan(backend).as_tuple())
                reference[causal] = _call.attention(kern, q, k, v, scale, causal)
            plans[backend] = candidates(backend, quick, blas)
            for plan in plans[backend]:
                for causal in (False, True):
                    out = np.empty_like(q)

                    def fn(plan=plan, causal=causal, out=out, kern=kern, set_plan=set_plan):
                        set_plan(plan)
                        _call.attention_into(kern, out, q, k, v, scale, causal, 0)
                        return out

                    info = {"backend": backend, "plan": plan, "causal": causal, "reference": reference[causal]}
                    contenders.append(timing.Contender(f"{backend} {plan} causal={causal}", fn, info))

        def check(c, result):
            ref = c.info["reference"]
            err = float(np.max(np.abs(result - ref))) if ref.size else 0.0
            if not err <= tol * max(1.0, float(np.max(np.abs(ref)))):
                raise AssertionError(f"plan {c.info['plan']} differs from the built-in plan's result by {err:.3g}")

        def skip(c):
            if progress is not None:
                progress.note(f"  dropped {c.name}: {c.error}")

        budget = 0.5 if quick else 2.0
        timing.run_interleaved(contenders, rounds=rounds, budget_s=budget, min_rounds=min(3, rounds),
                               on_first=check, on_skip=skip)  # fmt: skip
    _backends.refresh_plans()  # the plans of the cache again (the candidates overwrote them)
    found = {}
    for backend in backends:
        results = []
        for plan in plans[backend]:
            pair = [c for c in contenders if c.info["backend"] == backend and c.info["plan"] == plan]
            if not all(c.ok for c in pair):
                continue
            med = {c.info["causal"]: c.stats().median for c in pair}
            results.append({"tiles": plan[0], "block_q": plan[1], "block_k": plan[2], "full_s": med[False],
                            "causal_s": med[True], "score_s": med[False] + med[True]})  # fmt: skip
        results.sort(key=lambda r: r["score_s"])
        builtin = _plans.builtin_plan(backend).as_tuple()
        base = next((r for r in results if (r["tiles"], r["block_q"], r["block_k"]) == builtin), None)
        if results and base is not None and base["score_s"] <= results[0]["score_s"] * (1 + TIE):
            results.remove(base)  # within the noise of the fastest: the built-in plan stays
            results.insert(0, base)
        found[backend] = results
    if progress is not None:
        progress.step(f"{dtype} d={head_dim} {threads} threads: {sum(map(len, found.values()))} plans measured")
    return found


def run(args) -> int:
    from fastattn import _backends, _plans

    if not args.cache:
        return _run(args)
    _plans._cache_override[0] = args.cache
    _backends.refresh_plans()
    try:
        return _run(args)
    finally:
        _plans._cache_override[0] = None
        _backends.refresh_plans()


def _run(args) -> int:
    import fastattn
    from fastattn import _backends, _plans

    from . import timing

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise SystemExit(f"fastattn tune: --dtypes takes float32 and float64, got {d!r}")
    head_dims = _ints(args.head_dims, "--head-dims")
    threads = _ints(args.threads, "--threads") if args.threads else [fastattn.get_num_threads()]
    available = [b for b in fastattn.available_backends() if b in _plans.COMPILED]
    backends = available if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in available:
            raise SystemExit(f"fastattn tune: backend {b!r} is not an available compiled backend ({available})")
    if not backends:
        print("fastattn tune: no compiled backend is available here; nothing to tune", file=sys.stderr)
        return 1
    n = args.n or (64 if args.quick else 1024)
    heads = args.heads or (2 if args.quick else 12)
    rounds = args.rounds or (3 if args.quick else 7)
    blas = args.blas and not args.quick

    m = _plans.machine()
    print(f"fastattn tune on {m['cpu']} ({m['family']}, {m['isa']}); B=1 H={heads} N={n}, full + causal, "
          f"threads {','.join(map(str, threads))}; side by side, interleaved, medians of {rounds} rounds")  # fmt: skip
    progress = timing.Progress(len(dtypes) * len(head_dims) * len(threads), enabled=not args.quiet)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries, report = {}, []
    for t in threads:
        for dtype in dtypes:
            for d in head_dims:
                shape = {"n": n, "heads": heads, "rounds": rounds, "quick": args.quick, "blas": blas}
                found = measure(backends, dtype, d, t, **shape, progress=progress)
                best = {b: rows[0] for b, rows in found.items() if rows}
                if not best:
                    continue
                ranked = sorted(best, key=lambda b: best[b]["score_s"])
                faster = ranked[0]
                speedup = best[ranked[1]]["score_s"] / best[faster]["score_s"] if len(ranked) > 1 else None
                tie = speedup is not None and speedup < 1 + TIE
                entry = {
                    "date": date,
                    "cpu": m["cpu"],
                    "isa": m["isa"],
                    "threads": t,
                    "dtype": dtype,
                    "head_dim": d,
                    "shape": f"B=1 H={heads} N={n} full+causal" + (" (quick)" if args.quick else ""),
                    "plans": {b: {k: r[k] for k in _STORED} for b, r in best.items()},
                    "faster": faster if len(ranked) > 1 and not tie else None,
                    "speedup": speedup,
                    "fastattn": fastattn.__version__,
                }
                entries[_plans.entry_key(t, dtype, d)] = entry
                report.append({"threads": t, "dtype": dtype, "head_dim": d, "measured": found})
                for b in backends:
                    rows = found[b]
                    if not rows:
                        print(f"  {b:7s} {dtype} d={d} threads={t}: no plan ran")
                        continue
                    builtin = _plans.builtin_plan(b).as_tuple()
                    base = next((r for r in rows if (r["tiles"], r["block_q"], r["block_k"]) == builtin), None)
                    gain = ""
                    if base:
                        gain = f", {base['score_s'] / rows[0]['score_s']:.2f}x the built-in {builtin[1]}x{builtin[2]}"
                    print(f"  {b:7s} {dtype} d={d} threads={t}: {rows[0]['tiles']} {rows[0]['block_q']}x"
                          f"{rows[0]['block_k']}  full {timing.format_seconds(rows[0]['full_s'])}, causal "
                          f"{timing.format_seconds(rows[0]['causal_s'])}{gain}")  # fmt: skip
                if entry["faster"]:
                    print(f"  faster: {faster} ({speedup:.2f}x)")
                elif tie:
                    print(f"  {faster} {speedup:.2f}x: within {TIE:.0%}, a tie; the automatic choice keeps its order")
    progress.finish()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": m, "date": date, "runs": report}, f, indent=1)
    if args.dry_run:
        print("dry run: nothing stored")
    elif entries:
        path = _plans.store(entries)
        print(f"stored {len(entries)} plan(s) in {path}")
    _backends.refresh_plans()
    info = fastattn.plan_info()
    for b, p in info["backends"].items():
        print(f"{b}: {p.get('plan', p.get('unavailable'))} ({p.get('source', '')})")
    print(f"automatic backend: {info['why']}")
    return 0
