"""``python -m fastattn bench``: fastattn against the oracle and PyTorch, side by side in one process.

For each point of a fixed grid (a shape, a dtype, a mask) every contender is built on the same seeded data, called
once (its first call, compile included, reported apart), then timed in interleaved rounds, one sample each per
round (``fastattn._timing.run_interleaved``), so that machine drift hits them alike. The attention oracle alone is
timed in a phase of its own just before the others at the same point: its N² memory traffic slows whatever runs
next to it. Each contender's first result
is checked against the reference of its point (the oracle, else PyTorch, else the first contender).

Families and contenders
-----------------------
attention  (B, H, N, d), full and causal: ``<backend> fused`` (the ``attention`` kernel of each compiled backend),
           ``<backend> stages`` (its ``scores`` -> ``softmax`` -> ``weighted_sum`` kernels), ``oracle``
           (``fastattn.oracle.scaled_dot_product_attention``, the baseline) and ``torch sdpa``
           (``torch.nn.functional.scaled_dot_product_attention``). GFLOP/s = 4·N²·d·H·B / t, half when causal.
attention_backward  (B, H, N, d), full and causal: ``<backend> fused backward`` (the ``attention_backward``
           kernel, from the forward's saved output and log-sum-exp) against ``torch sdpa backward`` (the baseline:
           ``.backward(grad)`` of ``scaled_dot_product_attention`` with ``requires_grad``, its graph built outside
           the timer and kept with ``retain_graph``, so the backward alone is timed). GFLOP/s counts 2.5x the
           forward's FLOPs (the backward's five tile products against the forward's two).
embedding  T ids into a (V, D) table: ``<backend> gather``, ``numpy table[ids]`` (the baseline: the literal one-hot
           oracle would do 2·T·V·D FLOPs, 5 TFLOP at the default size), ``torch embedding``
           (``nn.functional.embedding``) and ``torch index_select``. GB/s = (2·T·D·itemsize + 8·T) / t.

Output: a table on stdout (median, IQR/median, GFLOP/s or GB/s, share of the matrix-multiply peak measured in the
same run, speed-up over the baseline and over PyTorch, first-call time), a JSON file (``--json``, default
``bench_results/bench-<timestamp>.json``) and, when matplotlib is installed, a PNG of GFLOP/s against N beside it.
Progress goes to stderr. ``--from-json PATH`` re-renders a saved run (``--markdown`` for the README) without
measuring.

JSON fields (``schema`` ``"fastattn.bench/1"``)
------------------------------------------------
Top level: ``schema``, ``created`` (ISO time), ``command`` (the exact command line, when run as
``python -m fastattn bench``), ``elapsed_s``, ``machine`` (cpu, logical_cores, usable_cores, avx2, avx512f,
platform, python/numpy/numba/scipy/torch/threadpoolctl versions, backends: name -> None or why unavailable),
``settings`` (the grid and options in force), ``threads`` (what fastattn, torch and NumPy's BLAS used), ``peak``
(dtype -> {gflops, source, all}), ``torch`` (version or null), ``skipped`` ([{contender, reason}]), ``plot`` (PNG
path or null) and ``results``, one record per contender per grid point:

- the point: ``family`` ("attention" or "embedding"), ``dtype``; attention: ``batch``, ``heads``, ``seq_len``,
  ``head_dim``, ``causal``; embedding: ``tokens``, ``vocab``, ``d_model``;
- the contender: ``contender`` (e.g. "numba fused"), ``kind`` (fused, stages, gather, oracle, baseline, peer),
  ``backend`` (fastattn backend or null);
- times in seconds per call: ``median_s``, ``p25_s``, ``p75_s``, ``min_s``, ``spread`` (IQR / median), ``rounds``,
  ``inner`` (calls per sample), ``first_call_s``;
- rates: ``flop`` and ``gflops`` (attention) or ``bytes`` and ``gbps`` (embedding), ``peak_share`` (gflops over the
  measured matmul peak);
- comparisons: ``baseline`` (its name), ``vs_baseline`` and ``vs_torch`` (speed-up: their median / this median);
- ``check`` (null, or how the first result differed from the point's reference), ``error`` (null, or why the
  contender was dropped: it raised).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

HELP = "time fastattn against the oracle and PyTorch side by side on a fixed grid (table, JSON, PNG)"

SCHEMA = "fastattn.bench/1"

#: The fixed grids. ``--quick`` takes the second; any option given on the command line overrides either.
GRIDS = {
    "full": {
        "seq_lens": (128, 512, 1024, 2048, 4096),
        "tokens": (4096, 65536),
        "rounds": 15,
        "min_sample_ms": 10.0,
        "budget_s": 3.0,
        "peak_size": 2048,
    },
    "quick": {
        "seq_lens": (128, 256, 512),
        "tokens": (8192,),
        "rounds": 5,
        "min_sample_ms": 2.0,
        "budget_s": 0.4,
        "peak_size": 1024,
    },
}
DEFAULTS = {
    "families": ("attention", "embedding"),
    "batch": 1,
    "heads": 12,
    "head_dim": 64,
    "vocab": 50257,
    "d_model": 768,
    "dtypes": ("float32",),
    "masks": ("full", "causal"),
}
FAMILIES = ("attention", "embedding", "attention_backward")
MASKS = ("full", "causal")
COMPILED = ("numba", "cython")


def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if kind is int:
            try:
                values = tuple(int(t) for t in items)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected integers such as 128,512, got {text!r}") from None
            if any(v < 1 for v in values):
                raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
            return values
        bad = [t for t in items if t not in kind]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(kind)}")
        return tuple(items)

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser) -> None:
    g = parser.add_argument_group("grid (defaults: the full grid, or the quick one with --quick)")
    g.add_argument("--quick", action="store_true", help="a small grid that runs in under a minute")
    g.add_argument(
        "--families", type=_csv(FAMILIES), help="attention,embedding,attention_backward (default: the first two)"
    )
    g.add_argument("-n", "--seq-lens", type=_csv(int), help="attention N values (full: 128,512,1024,2048,4096)")
    g.add_argument("--batch", type=_positive_int, help="attention batch B (default 1)")
    g.add_argument("--heads", type=_positive_int, help="attention heads H (default 12)")
    g.add_argument("--head-dim", type=_positive_int, help="attention head width d (default 64)")
    g.add_argument("--masks", type=_csv(MASKS), help="full,causal (default: both)")
    g.add_argument("--tokens", type=_csv(int), help="embedding ids per call (full: 4096,65536)")
    g.add_argument("--vocab", type=_positive_int, help="embedding table rows V (default 50257)")
    g.add_argument("--d-model", type=_positive_int, help="embedding table width D (default 768)")
    g.add_argument("--dtypes", type=_csv(("float32", "float64")), help="float32,float64 (default float32)")
    c = parser.add_argument_group("contenders")
    c.add_argument("--backends", type=_csv(COMPILED), help="compiled fastattn backends (default: all available)")
    c.add_argument("--no-stages", action="store_true", help="leave out the stage-by-stage attention contenders")
    c.add_argument("--no-oracle", action="store_true", help="leave out the oracle (and the x-oracle column)")
    c.add_argument("--no-torch", action="store_true", help="leave out PyTorch even when it is installed")
    t = parser.add_argument_group("timing")
    t.add_argument("--threads", type=_positive_int, help="threads for fastattn, PyTorch and NumPy's BLAS")
    t.add_argument("--rounds", type=_positive_int, help="interleaved rounds per point (full 15, quick 5)")
    t.add_argument("--min-sample-ms", type=float, help="a sample repeats short calls to last this long")
    t.add_argument(
        "--budget-s", type=float, help="seconds per contender per point; slower ones get fewer rounds (never under 3)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="where to write the JSON (default bench_results/bench-<time>.json)")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG (written only with matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    o.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    o.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: print the table of an earlier run's JSON (and, unless --no-plot, redraw its PNG)",
    )


def settings_from(args) -> dict:
    """The effective settings: the chosen grid, overridden by every option given."""
    grid = "quick" if args.quick else "full"
    s = {"grid": grid, **GRIDS[grid], **DEFAULTS}
    for key in (
        "families",
        "seq_lens",
        "batch",
        "heads",
        "head_dim",
        "masks",
        "tokens",
        "vocab",
        "d_model",
        "dtypes",
        "rounds",
        "min_sample_ms",
        "budget_s",
    ):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    s["threads"] = args.threads
    s["seed"] = args.seed
    return s


def _command_line() -> str | None:
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        return "python -m fastattn " + shlex.join(sys.argv[1:])
    return None


# --------------------------------------------------------------------------------------------------------------
# Contenders of one grid point
# --------------------------------------------------------------------------------------------------------------
class _Point:
    """One grid point: its description, its contenders, the work of one call (FLOPs or bytes)."""

    def __init__(self, family, label, params, contenders, flop=None, nbytes=None, baseline=None, check=None):
        self.family, self.label, self.params = family, label, params
        self.contenders, self.flop, self.nbytes = contenders, flop, nbytes
        self.baseline, self.check = baseline, check


def _attention_point(s, dtype, n, causal, backends, torch, kernels):
    import math

    import numpy as np

    from . import _timing, oracle
    from ._cython_compat import lse_scratch  # TEMPORARY until cython-backward merges (then: np.empty)

    B, H, d = s["batch"], s["heads"], s["head_dim"]
    rng = np.random.default_rng(s["seed"])
    q, k, v = (rng.standard_normal((B, H, n, d), dtype=np.float64).astype(dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (B, H, n, n))
    no_bias = np.broadcast_to(np.zeros((1, 1), dtype=dtype), (B, n))
    contenders = []
    C = _timing.Contender

    if not s["no_oracle"]:
        contenders.append(
            C("oracle", lambda: oracle.scaled_dot_product_attention(q, k, v, is_causal=causal), {"kind": "oracle"})
        )
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_sdpa():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=causal)

        contenders.append(C("torch sdpa", torch_sdpa, {"kind": "peer"}))
    for name in backends:
        kern = kernels.get(name)
        if kern is None:
            continue
        out = np.zeros((B, H, n, d), dtype=dtype)
        lse = lse_scratch(kern, (B, H, n), dtype)

        def fused(kern=kern, out=out, lse=lse):
            kern.attention(out, lse, q, k, v, scale, causal, 0, 0, no_mask, False, no_bias, False)
            return out

        contenders.append(C(f"{name} fused", fused, {"kind": "fused", "backend": name}))
        if not s["no_stages"]:
            scores = np.empty((B, H, n, n), dtype=dtype)
            rows = scores.reshape(-1, n)
            o = np.zeros((B, H, n, d), dtype=dtype)

            def stages(kern=kern, scores=scores, rows=rows, o=o):
                kern.scores(scores, q, k, scale, causal, 0, 0, no_mask, False, no_bias, False)
                kern.softmax(rows, rows)
                kern.weighted_sum(o, scores, v)
                return o

            contenders.append(C(f"{name} stages", stages, {"kind": "stages", "backend": name}))
    label = f"attention {dtype} B={B} H={H} d={d} N={n} {'causal' if causal else 'full'}"
    params = {"dtype": dtype, "batch": B, "heads": H, "seq_len": n, "head_dim": d, "causal": causal}
    tol = {"rtol": 2e-3, "atol": 2e-4} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-11}
    return _Point(
        "attention",
        label,
        params,
        contenders,
        flop=_timing.attention_flop(B, H, n, n, d, causal),
        baseline="oracle",
        check=tol,
    )


def _attention_backward_point(s, dtype, n, causal, backends, torch, kernels):
    import math

    import numpy as np

    from . import _timing

    B, H, d = s["batch"], s["heads"], s["head_dim"]
    rng = np.random.default_rng(s["seed"])
    q, k, v, g = (rng.standard_normal((B, H, n, d), dtype=np.float64).astype(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    no_mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (B, H, n, n))
    no_bias = np.broadcast_to(np.zeros((1, 1), dtype=dtype), (B, n))
    contenders = []
    C = _timing.Contender
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
        t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tg = torch.from_numpy(g)

        def torch_backward():
            for t in (tq, tk, tv):
                t.grad = None
            t_out.backward(tg, retain_graph=True)
            return tq.grad

        contenders.append(C("torch sdpa backward", torch_backward, {"kind": "peer"}))
    for name in backends:
        kern = kernels.get(name)
        if kern is None or not hasattr(kern, "attention_backward"):
            continue
        out, lse = np.zeros((B, H, n, d), dtype=dtype), np.empty((B, H, n), dtype=dtype)
        kern.attention(out, lse, q, k, v, scale, causal, 0, 0, no_mask, False, no_bias, False)
        grads = tuple(np.empty((B, H, n, d), dtype=dtype) for _ in range(3))

        def fused_backward(kern=kern, out=out, lse=lse, grads=grads):
            kern.attention_backward(*grads, g, q, k, v, out, lse, scale, causal, 0, 0, no_mask, False, no_bias, False)
            return grads[0]

        contenders.append(C(f"{name} fused backward", fused_backward, {"kind": "fused", "backend": name}))
    label = f"attention backward {dtype} B={B} H={H} d={d} N={n} {'causal' if causal else 'full'}"
    params = {"dtype": dtype, "batch": B, "heads": H, "seq_len": n, "head_dim": d, "causal": causal}
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == "float32" else {"rtol": 1e-8, "atol": 1e-10}
    return _Point(
        "attention_backward",
        label,
        params,
        contenders,
        flop=2.5 * _timing.attention_flop(B, H, n, n, d, causal),
        baseline="torch sdpa backward" if torch is not None else None,
        check=tol,
    )


def _embedding_point(s, dtype, tokens, backends, torch, kernels):
    import numpy as np

    from . import _timing

    V, D = s["vocab"], s["d_model"]
    rng = np.random.default_rng(s["seed"])
    table = rng.standard_normal((V, D), dtype=np.float32 if dtype == "float32" else np.float64)
    ids = rng.integers(0, V, size=tokens, dtype=np.int64)
    C = _timing.Contender
    contenders = [C("numpy table[ids]", lambda: table[ids], {"kind": "baseline"})]
    if torch is not None:
        ttable, tids = torch.from_numpy(table), torch.from_numpy(ids)
        embedding = torch.nn.functional.embedding

        def torch_embedding():
            with torch.no_grad():
                return embedding(tids, ttable)

        contenders.append(C("torch embedding", torch_embedding, {"kind": "peer"}))
        contenders.append(C("torch index_select", lambda: torch.index_select(ttable, 0, tids), {"kind": "peer"}))
    for name in backends:
        kern = kernels.get(name)
        if kern is None:
            continue
        out = np.empty((tokens, D), dtype=dtype)

        def gather(kern=kern, out=out):
            kern.gather(out, ids, table)
            return out

        contenders.append(C(f"{name} gather", gather, {"kind": "gather", "backend": name}))
    itemsize = np.dtype(dtype).itemsize
    label = f"embedding {dtype} T={tokens} V={V} D={D}"
    params = {"dtype": dtype, "tokens": tokens, "vocab": V, "d_model": D}
    return _Point(
        "embedding",
        label,
        params,
        contenders,
        nbytes=2.0 * tokens * D * itemsize + 8.0 * tokens,
        baseline="numpy table[ids]",
        check={"rtol": 0.0, "atol": 0.0},
    )


def _points(s, backends, torch, kernels):
    """The grid, in the order it runs: a generator, so that the data of one point is freed before the next."""
    for dtype in s["dtypes"]:
        if "attention" in s["families"]:
            for causal in [m == "causal" for m in s["masks"]]:
                for n in s["seq_lens"]:
                    yield lambda dtype=dtype, n=n, causal=causal: _attention_point(
                        s, dtype, n, causal, backends, torch, kernels
                    )
        if "embedding" in s["families"]:
            for t in s["tokens"]:
                yield lambda dtype=dtype, t=t: _embedding_point(s, dtype, t, backends, torch, kernels)
        if "attention_backward" in s["families"]:
            for causal in [m == "causal" for m in s["masks"]]:
                for n in s["seq_lens"]:
                    yield lambda dtype=dtype, n=n, causal=causal: _attention_backward_point(
                        s, dtype, n, causal, backends, torch, kernels
                    )


def _n_points(s) -> int:
    per_dtype = 0
    if "attention" in s["families"]:
        per_dtype += len(s["masks"]) * len(s["seq_lens"])
    if "embedding" in s["families"]:
        per_dtype += len(s["tokens"])
    if "attention_backward" in s["families"]:
        per_dtype += len(s["masks"]) * len(s["seq_lens"])
    return per_dtype * len(s["dtypes"])


# --------------------------------------------------------------------------------------------------------------
# Records, table, plot
# --------------------------------------------------------------------------------------------------------------
def _as_numpy(result):
    import numpy as np

    if hasattr(result, "detach"):  # a torch tensor
        result = result.detach().numpy()
    return np.asarray(result)


def _records(point: _Point, peak: dict | None, checks: dict) -> list[dict]:
    by_name = {c.name: c for c in point.contenders}

    def median_of(name):
        c = by_name.get(name)
        return c.stats().median if c is not None and c.ok else None

    base = median_of(point.baseline) if point.baseline else None
    torch_name = {"attention": "torch sdpa", "attention_backward": "torch sdpa backward"}.get(
        point.family, "torch embedding"
    )
    torch_median = median_of(torch_name)
    rows = []
    for c in point.contenders:
        st = c.stats() if c.ok else None
        rec = {
            "family": point.family,
            **point.params,
            "contender": c.name,
            "kind": c.info.get("kind"),
            "backend": c.info.get("backend"),
            "median_s": st.median if st else None,
            "p25_s": st.p25 if st else None,
            "p75_s": st.p75 if st else None,
            "min_s": st.min if st else None,
            "spread": st.spread if st else None,
            "rounds": len(c.samples),
            "inner": c.inner,
            "first_call_s": c.first_call_s,
            "flop": point.flop,
            "gflops": point.flop / st.median / 1e9 if st and point.flop else None,
            "bytes": point.nbytes,
            "gbps": point.nbytes / st.median / 1e9 if st and point.nbytes else None,
            "peak_share": None,
            "baseline": point.baseline,
            "vs_baseline": base / st.median if st and base else None,
            "vs_torch": torch_median / st.median if st and torch_median and c.name != torch_name else None,
            "check": checks.get(c.name),
            "error": c.error,
        }
        if rec["gflops"] is not None and peak:
            rec["peak_share"] = rec["gflops"] / peak["gflops"]
        rows.append(rec)
    return rows


def _section_key(r):
    return (r["family"], r["dtype"], r.get("causal"))


def describe_run(doc: dict) -> list[str]:
    """Where and how a run was measured: hardware, versions, threads, the command."""
    m, th = doc["machine"], doc["threads"]
    simd = "AVX-512" if m.get("avx512f") else "AVX2" if m.get("avx2") else "no AVX2"
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "numba", "torch") if m.get(k))
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, {simd}; {versions}",
        "threads: " + ", ".join(f"{k} {v}" for k, v in th.items()),
    ]
    if doc.get("command"):
        lines.append(f"command: {doc['command']}")
    return lines


def _sections(records: list[dict], peaks: dict):
    """(title lines, column heads, rows of cells) per family, dtype and mask, rows by size then contender."""
    from ._timing import format_rate, format_ratio, format_seconds

    sections: dict = {}
    for r in records:
        sections.setdefault(_section_key(r), []).append(r)
    for (family, dtype, causal), rows in sections.items():
        first = rows[0]
        if family == "attention_backward":
            mask = "causal" if causal else "full"
            title = [
                f"attention backward, {dtype}, {mask}: B={first['batch']} H={first['heads']} d={first['head_dim']}; "
                f"GFLOP/s = 2.5*4*N^2*d*H*B/t{' / 2 (causal)' if causal else ''}; baseline = torch sdpa backward"
            ]
            size_key, size_head, rate_key, rate_unit, base_head = "seq_len", "N", "gflops", "GFLOP/s", "x torch bw"
        elif family == "attention":
            peak = peaks.get(dtype)
            mask = "causal" if causal else "full"
            title = [
                f"attention, {dtype}, {mask}: B={first['batch']} H={first['heads']} d={first['head_dim']}; "
                f"GFLOP/s = 4*N^2*d*H*B/t{' / 2 (causal)' if causal else ''}; baseline = oracle"
            ]
            if peak:
                title.append(f"%peak = share of {peak['gflops']:.0f} GFLOP/s ({peak['source']}, measured in this run)")
            size_key, size_head, rate_key, rate_unit, base_head = "seq_len", "N", "gflops", "GFLOP/s", "x oracle"
        else:
            title = [
                f"embedding, {dtype}: table V={first['vocab']} x D={first['d_model']}; "
                "GB/s = (2*T*D*itemsize + 8*T)/t; baseline = numpy table[ids] "
                "(the one-hot oracle would do 2*T*V*D FLOPs)"
            ]
            size_key, size_head, rate_key, rate_unit, base_head = "tokens", "T", "gbps", "GB/s", "x table[ids]"
        heads = [size_head, "contender", "median", "IQR/med", rate_unit, "%peak", base_head, "x torch", "first call"]
        cells = []
        for r in rows:
            if r["error"]:
                cells.append([str(r[size_key]), r["contender"], f"skipped: {r['error']}"])
                continue
            if r["median_s"] is None:
                continue
            cells.append(
                [
                    str(r[size_key]),
                    r["contender"],
                    format_seconds(r["median_s"]),
                    f"{100 * r['spread']:.1f}%",
                    format_rate(r[rate_key]),
                    "-" if r["peak_share"] is None else f"{100 * r['peak_share']:.1f}%",
                    format_ratio(r["vs_baseline"]),
                    format_ratio(r["vs_torch"]),
                    format_seconds(r["first_call_s"]) + (" !" if r["check"] else ""),
                ]
            )
        yield title, heads, cells


NOTE = (
    "median: of the per-call times of interleaved rounds; IQR/med: interquartile range over the median; "
    "x oracle, x table[ids], x torch: speed-up (their median / this median); first call: includes compilation"
)


def format_table(records: list[dict], peaks: dict, *, markdown: bool = False) -> str:
    """The table of ``records``: aligned text, or Markdown (for the README)."""
    lines = []
    for title, heads, cells in _sections(records, peaks):
        if markdown:
            lines += [f"**{title[0]}**" + ("  " if len(title) > 1 else "")] + title[1:] + [""]
            lines.append("| " + " | ".join(heads) + " |")
            lines.append("|" + "|".join(" ---: " if i != 1 else " --- " for i in range(len(heads))) + "|")
            for row in cells:
                row = row + [""] * (len(heads) - len(row))
                lines.append("| " + " | ".join(row) + " |")
        else:
            lines += title[:1] + ["  " + t for t in title[1:]]
            full_rows = [row for row in cells if len(row) == len(heads)]
            widths = [max([len(h)] + [len(row[i]) for row in full_rows]) for i, h in enumerate(heads)]

            def fmt(row, widths=widths):
                return "  ".join(c.ljust(widths[i]) if i == 1 else c.rjust(widths[i]) for i, c in enumerate(row))

            lines.append(fmt(heads))
            lines.append("-" * len(fmt(heads)))
            for row in cells:
                lines.append(fmt(row) if len(row) == len(heads) else "  ".join([row[0].rjust(widths[0]), *row[1:]]))
        lines.append("")
    bad = [r for r in records if r["check"]]
    if bad:
        lines.append("! result differs from the reference of its point:")
        lines += [f"  {r['contender']} at {r.get('seq_len', r.get('tokens'))}: {r['check']}" for r in bad]
        lines.append("")
    lines.append(NOTE)
    return "\n".join(lines)


def write_plot(records: list[dict], path: str, peaks: dict | None = None, title: str | None = None) -> str | None:
    """A PNG of GFLOP/s against N per contender, one panel per dtype and mask (full, then causal), with the measured
    matrix-multiply peak as a dotted line. Returns None (and writes nothing) without matplotlib."""
    from ._timing import optional_import

    mpl, _ = optional_import("matplotlib")
    if mpl is None:
        return None
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = {}
    for r in records:
        if r["family"] == "attention" and r["gflops"] is not None:
            key = (r["dtype"], r["causal"])
            panels.setdefault(key, {}).setdefault(r["contender"], []).append((r["seq_len"], r["gflops"]))
    if not panels:
        return None
    keys = sorted(panels)
    names = sorted({name for panel in panels.values() for name in panel})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    first = next(r for r in records if r["family"] == "attention")
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        sizes = set()
        for name, pts in sorted(panels[key].items()):
            pts.sort()
            sizes.update(p[0] for p in pts)
            style = "--" if name in ("oracle", "torch sdpa") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colours[name], label=name)
        peak = (peaks or {}).get(key[0])
        if peak:
            ax.axhline(peak["gflops"], color="grey", linestyle=":", label=f"matmul peak ({peak['gflops']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("N (sequence length)")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(
            f"attention {key[0]} {'causal' if key[1] else 'full'}, "
            f"B={first['batch']} H={first['heads']} d={first['head_dim']}"
        )
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _default_json_path() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("bench_results", f"bench-{stamp}.json")


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
def _compiled_kernels(wanted, say) -> dict:
    """name -> kernel module for each wanted compiled backend that imports; the others are reported and left out."""
    from . import _backends
    from ._timing import backend_reasons

    status = backend_reasons(wanted)
    found = {}
    for name in wanted:
        if status.get(name) is not None:
            say(f"bench: skipping backend {name}: {status[name]}")
            continue
        try:
            found[name] = _backends.kernels(name)
        except Exception as exc:
            from ._timing import first_use_error

            say(f"bench: skipping backend {name}: it raised on first use: {first_use_error(exc)}")
    return found


def _render(doc: dict, args) -> None:
    """Print the run's description and table; draw its PNG unless --no-plot (sets ``doc["plot"]``)."""
    head = describe_run(doc)
    if args.markdown:
        print("\n".join(f"{line}  " for line in head) + "\n")
    else:
        print("\n".join(head) + "\n")
    print(format_table(doc["results"], doc["peak"], markdown=args.markdown))


def _plot_title(doc: dict) -> str:
    m = doc["machine"]
    return (
        f"fastattn {m['fastattn']} on {m['cpu']} ({m['usable_cores']} cores), threads {doc['threads'].get('fastattn')}"
    )


def _from_json(args) -> int:
    with open(args.from_json) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        print(f"bench: {args.from_json} is not a {SCHEMA} file (schema {doc.get('schema')!r})", file=sys.stderr)
        return 2
    _render(doc, args)
    if not args.no_plot:
        png = write_plot(
            doc["results"], os.path.splitext(args.json or args.from_json)[0] + ".png", doc["peak"], _plot_title(doc)
        )
        print(f"\nwrote {png}" if png else "\nno PNG written (pip install matplotlib)")
    return 0


def run(args) -> int:
    import numpy as np

    from . import _backends, _timing

    if args.from_json:
        return _from_json(args)
    s = settings_from(args)
    s["no_stages"], s["no_oracle"] = args.no_stages, args.no_oracle
    progress = _timing.Progress(_n_points(s), enabled=not args.no_progress)

    def say(text):
        print(text, file=sys.stderr, flush=True)

    torch, torch_reason = (None, "left out (--no-torch)") if args.no_torch else _timing.optional_import("torch")
    if torch is None:
        say(f"bench: PyTorch peers skipped: {torch_reason}")
    if args.backends is not None:
        wanted = list(args.backends)
    else:
        wanted = [b for b in _backends.PREFERENCE if b in COMPILED]
    kernels = _compiled_kernels(wanted, say)

    records, skipped, peaks = [], [], {}
    seen_errors = set()

    def on_skip(c):
        key = (c.name, c.error)
        skipped.append({"contender": c.name, "reason": c.error})
        if key not in seen_errors:
            seen_errors.add(key)
            say(f"bench: {c.name} skipped: {c.error}")

    started = _timing.clock()
    try:
        pinned = _timing.pin_threads(s["threads"])
        threads = pinned.__enter__()
    except ValueError as exc:  # e.g. more threads than NUMBA_NUM_THREADS allows
        say(f"bench: cannot use --threads {s['threads']}: {exc}")
        return 2
    try:
        if "attention" in s["families"]:
            for dtype in s["dtypes"]:
                progress.note(f"bench: measuring the {dtype} matrix-multiply peak ({s['peak_size']}^3)")
                peaks[dtype] = _timing.matmul_peak(dtype, s["peak_size"], use_torch=torch is not None)
        for make in _points(s, list(kernels), torch, kernels):
            point = make()
            progress.step(point.label)
            checks, reference = {}, {}

            def on_first(c, result, point=point, checks=checks, reference=reference):
                got = _as_numpy(result)
                if "value" not in reference:
                    reference["value"], reference["name"] = got.copy(), c.name
                    return
                ref = reference["value"]
                if got.shape != ref.shape:
                    checks[c.name] = f"shape {got.shape} != {ref.shape} of {reference['name']}"
                elif not np.allclose(got, ref, equal_nan=True, **point.check):
                    err = float(np.nanmax(np.abs(got.astype(np.float64) - ref)))
                    checks[c.name] = f"max |difference| {err:.3g} from {reference['name']}"

            # The oracle is timed in a phase of its own, before the others: it materialises L x S scores (0.8 GB
            # at N = 4096), and the page faults and spinning BLAS threads it leaves behind slowed every contender
            # timed next to it about twofold, torch included (measured: 27.6 vs 14.1 ms for torch at N = 1024).
            # The others stay interleaved round by round. Its first call still provides the reference result.
            alone = [c for c in point.contenders if c.info.get("kind") == "oracle"]
            together = [c for c in point.contenders if c.info.get("kind") != "oracle"]
            for group in (alone, together):
                if group:
                    _timing.run_interleaved(
                        group,
                        rounds=s["rounds"],
                        min_sample_s=s["min_sample_ms"] / 1e3,
                        budget_s=s["budget_s"],
                        on_skip=on_skip,
                        on_first=on_first,
                    )
            records += _records(point, peaks.get(point.params["dtype"]), checks)
            del point, reference
    finally:
        pinned.__exit__(None, None, None)
    progress.finish()
    elapsed = _timing.clock() - started

    path = args.json or _default_json_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "elapsed_s": elapsed,
        "machine": _timing.machine_info(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "threads": threads,
        "peak": peaks,
        "torch": None if torch is None else torch.__version__,
        "skipped": skipped,
        "results": records,
        "plot": None,
    }
    _render(doc, args)
    if not args.no_plot:
        doc["plot"] = write_plot(records, os.path.splitext(path)[0] + ".png", peaks, _plot_title(doc))
        if doc["plot"] is None and "attention" in s["families"]:
            say("bench: no PNG written (pip install matplotlib, or fastattn[bench], to get one)")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    png = doc["plot"]
    print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" ({elapsed:.0f} s)")
    return 0
