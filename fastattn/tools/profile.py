"""``python -m fastattn profile``: where the time of the forward pass goes, stage by stage, per backend.

The stage pipeline is the forward pass with every step a separate call, made exactly as ``fastattn.forward`` makes
it (the backend's raw kernels on the same arrays; projections as NumPy ``x @ w`` with the heads split by
``fastattn._call.project_heads``, through the call layer like every other caller):

    embed          gather            ids (B, N) -> X (B·N, D)                      GB/s
    positions      add_positions     X + P[:N] -> (B, N, D)                        GB/s
    q/k/v proj     x @ w (NumPy)     (B, N, D) @ (D, H·d) -> (B, H, N, d) each     GFLOP/s
    scores         scores            Q Kᵀ · scale (causal: -inf above) (B, H, N, N) GFLOP/s
    softmax        softmax           row softmax in place                          GB/s
    weighted sum   weighted_sum      P V -> (B, H, N, d)                           GFLOP/s
    head merge     transpose+reshape (B, H, N, d) -> (B, N, H·d)                   GB/s
    out proj       x @ w_o (NumPy)   (B, N, H·d) @ (H·d, D)                        GFLOP/s

The backward of the attention is profiled the same way, from the forward's saved arrays (the score matrix and its
softmax, or the fused forward's output and log-sum-exp), on the backends that have the backward kernels:

    weighted sum backward  weighted_sum_backward  dP = dO Vᵀ, dV = Pᵀ dO                  GFLOP/s
    softmax backward       softmax_backward       dS = P ∘ (dP − rowsum(dP ∘ P))          GB/s
    scores backward        scores_backward        dQ = scale dS K, dK = scale dSᵀ Q       GFLOP/s
    fused backward         attention_backward     all three from out and lse, O(N) memory GFLOP/s (2.5x forward)

Each round runs the pipeline once with a clock read between stages (the per-stage times) and once without (the
measured total); the sum of the per-stage medians should come within ``--margin`` (default 15%) of the median total
(``within_margin``). On a busy machine a run of the whole pipeline is more often interrupted than a single stage,
so the medians drift apart there; the minimums (``stage_min_sum_s`` against ``total_min_s``) stay comparable.
The alternatives are timed in the same rounds: the fused ``attention`` kernel (instead of scores, softmax and
weighted sum), the fused ``gather_add_positions`` (instead of embed and positions; it is what ``forward`` uses) and
``fastattn.forward`` itself. The first call of every stage is timed apart (Numba compiles there, or loads its
on-disk cache) and never enters the medians.

FLOPs count useful work: 2·B·N·D·H·d per projection, 2·B·H·N²·d for scores and for the weighted sum, half of each
when causal. Bytes count the least traffic: what a stage must read and write once.

JSON fields (``--json``; ``schema`` ``"fastattn.profile/1"``)
---------------------------------------------------------------
Top level: ``schema``, ``created``, ``command``, ``machine`` (as in ``fastattn.bench``), ``threads``, ``params``
(batch, seq_len, d_model, heads, head_dim, vocab, dtype, causal, repeats, seed), ``margin`` and ``backends``, a
list with one entry per backend:

- ``backend``, ``status`` ("ok" or "skipped"), ``reason`` (null, or why it was skipped; a skipped entry has only
  these three);
- ``import_s`` (importing its kernels), ``first_calls_s`` (all first calls), ``compile_s`` (what the first calls
  took beyond steady state: compilation or loading Numba's cache);
- ``stages``: in pipeline order, each {``stage``, ``kernel``, ``median_s``, ``p25_s``, ``p75_s``, ``min_s``,
  ``first_call_s``, ``share`` (of the sum of stage medians), ``flop``, ``bytes``, ``gflops``, ``gbps``} (one of the
  two rates is null);
- ``stage_sum_s``, ``total_s`` (median measured pipeline), ``total_p25_s``, ``total_p75_s``, ``sum_vs_total``
  (stage_sum_s / total_s - 1), ``margin``, ``within_margin``; ``stage_min_sum_s``, ``total_min_s``, ``min_sum_vs_total``
  (the same by minimums);
- ``alternatives``: each {``name`` (fused_attention, embed_positions, forward), ``kernel``, ``replaces`` (stage
  names), ``median_s``, ``p25_s``, ``p75_s``, ``first_call_s``, ``replaced_s`` (median time of what it replaces),
  ``speedup``, ``flop``, ``bytes``, ``gflops``, ``gbps``};
- ``fused_pipeline_estimate_s``: the measured total with both fused kernels in place of what they replace;
- ``fused_phases``: {``available``, ``reason``, ``calls``, ``phases``: each {``phase`` (scores product, softmax
  pass, P·V product, fold into output), ``ticks`` (clock ticks summed over threads), ``share``}} (Cython only);
- ``backward``: {``stages`` (as the
  forward's: weighted_sum_backward, softmax_backward, scores_backward), ``stage_sum_s``, ``fused`` (as an
  alternative: name ``fused_attention_backward``, kernel ``attention_backward``, ``replaces`` the three stages)}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import types

HELP = "break the forward pass's time down by stage (embed ... output projection) per backend; --json for machines"

SCHEMA = "fastattn.profile/1"
DEFAULT_MARGIN = 0.15

#: (stage, kernel or operation) in pipeline order.
STAGES = (
    ("embed", "gather"),
    ("positions", "add_positions"),
    ("q_proj", "x @ w_q"),
    ("k_proj", "x @ w_k"),
    ("v_proj", "x @ w_v"),
    ("scores", "scores"),
    ("softmax", "softmax"),
    ("weighted_sum", "weighted_sum"),
    ("head_merge", "transpose+reshape"),
    ("out_proj", "x @ w_o"),
)
#: Backward stages of the attention, in the order they run.
BACKWARD_STAGES = (
    ("weighted_sum_backward", "weighted_sum_backward"),
    ("softmax_backward", "softmax_backward"),
    ("scores_backward", "scores_backward"),
)
#: (alternative, kernel, the stages it replaces). ``forward`` replaces the whole pipeline.
ALTERNATIVES = (
    ("fused_attention", "attention", ("scores", "softmax", "weighted_sum")),
    ("embed_positions", "gather_add_positions", ("embed", "positions")),
    ("forward", "fastattn.forward", tuple(name for name, _ in STAGES)),
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _backend_list(text: str):
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in ("numba", "cython", "numpy", "all")]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected names among numba, cython, numpy or 'all', got {text!r}")
    return tuple(items)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("sizes (default: GPT-2 small, one sequence of 1024 tokens)")
    g.add_argument("--batch", type=_positive_int, default=1, help="sequences B (default 1)")
    g.add_argument("--seq-len", type=_positive_int, default=1024, help="tokens per sequence N (default 1024)")
    g.add_argument("--d-model", type=_positive_int, default=768, help="model width D (default 768)")
    g.add_argument("--heads", type=_positive_int, default=12, help="heads H, D divisible by H (default 12)")
    g.add_argument("--vocab", type=_positive_int, default=50257, help="vocabulary V (default 50257)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--mask", choices=("causal", "full"), default="causal", help="attention mask (default causal)")
    r = parser.add_argument_group("run")
    r.add_argument(
        "--backends",
        type=_backend_list,
        help="comma list of numba, cython, numpy (the oracle, slow), or 'all' (default: every compiled one available)",
    )
    r.add_argument("--threads", type=_positive_int, help="threads for fastattn and NumPy's BLAS")
    r.add_argument("--repeats", type=_positive_int, default=10, help="timed rounds after the first call (default 10)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"allowed |sum of stages / measured total - 1| (default {DEFAULT_MARGIN})",
    )
    r.add_argument("--json", action="store_true", help="print JSON (the documented fields) instead of the table")


# --------------------------------------------------------------------------------------------------------------
# The stage pipeline of one backend
# --------------------------------------------------------------------------------------------------------------
class _Pipeline:
    """The forward pass of ``fastattn.forward`` cut into stages on one backend's kernels.

    ``steps`` are (stage, callable(state)) in order; each reads its inputs from ``state`` and stores its output
    there, allocating it as the forward pass does.
    """

    def __init__(self, kern, ids, params, causal: bool):
        import math

        import numpy as np

        from .. import _call

        self.kern, self.ids, self.params, self.causal = kern, ids, params, causal
        B, N = ids.shape
        D, H = params.d_model, params.n_heads
        d = params.w_q.shape[1] // H
        dt = params.embedding.dtype
        ids_flat = np.ascontiguousarray(ids.reshape(-1))
        table, pos = params.embedding, params.positions
        scale = 1.0 / math.sqrt(d)
        self.shape = (B, N, D, H, d)

        def embed(st):
            st.x = np.empty((B * N, D), dtype=dt)
            kern.gather(st.x, ids_flat, table)

        def positions(st):
            st.xp = np.empty((B, N, D), dtype=dt)
            kern.add_positions(st.xp, st.x.reshape(B, N, D), pos, 0)

        def q_proj(st):
            st.q = _call.project_heads(st.xp, params.w_q, params.b_q, H)

        def k_proj(st):
            st.k = _call.project_heads(st.xp, params.w_k, params.b_k, H)

        def v_proj(st):
            st.v = _call.project_heads(st.xp, params.w_v, params.b_v, H)

        def scores(st):
            st.s = _call.scores(kern, st.q, st.k, scale, causal)

        def softmax(st):
            rows = st.s.reshape(-1, N)
            kern.softmax(rows, rows)

        def weighted_sum(st):
            st.o = np.zeros((B, H, N, d), dtype=dt)
            kern.weighted_sum(st.o, st.s, st.v)

        def head_merge(st):
            st.m = st.o.transpose(0, 2, 1, 3).reshape(B, N, H * d)

        def out_proj(st):
            st.y = st.m @ params.w_o
            if params.b_o is not None:
                st.y += params.b_o

        fns = {
            "embed": embed,
            "positions": positions,
            "q_proj": q_proj,
            "k_proj": k_proj,
            "v_proj": v_proj,
            "scores": scores,
            "softmax": softmax,
            "weighted_sum": weighted_sum,
            "head_merge": head_merge,
            "out_proj": out_proj,
        }
        self.steps = [(name, fns[name]) for name, _ in STAGES]

        def fused_attention(st):
            return _call.attention(kern, st.q, st.k, st.v, scale, causal)

        def embed_positions(st):
            out = np.empty((B * N, D), dtype=dt)
            kern.gather_add_positions(out, ids_flat, table, pos, N, 0)
            return out

        self.fused_attention, self.embed_positions = fused_attention, embed_positions

    def new_state(self):
        return types.SimpleNamespace()

    def run(self, st) -> None:
        for _, step in self.steps:
            step(st)

    def run_timed(self, st, clock) -> list[float]:
        marks = [clock()]
        for _, step in self.steps:
            step(st)
            marks.append(clock())
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def work(self, itemsize: int) -> dict[str, tuple[float | None, float | None]]:
        """stage or alternative -> (FLOPs, bytes) of one call; one of them is None."""
        B, N, D, H, d = self.shape
        s = itemsize
        attn = 2.0 * B * H * N * N * d * (0.5 if self.causal else 1.0)  # one of Q Kᵀ and P V
        proj = 2.0 * B * N * D * H * d
        return {
            "embed": (None, 2.0 * B * N * D * s + 8.0 * B * N),
            "positions": (None, 2.0 * B * N * D * s + N * D * s),
            "q_proj": (proj, None),
            "k_proj": (proj, None),
            "v_proj": (proj, None),
            "scores": (attn, None),
            "softmax": (None, 2.0 * B * H * N * N * s),
            "weighted_sum": (attn, None),
            "head_merge": (None, 2.0 * B * N * H * d * s),
            "out_proj": (2.0 * B * N * H * d * D, None),
            "fused_attention": (2 * attn, None),
            "embed_positions": (None, 2.0 * B * N * D * s + N * D * s + 8.0 * B * N),
            "forward": (None, None),
        }


def _rates(work, median):
    flop, nbytes = work
    return {
        "flop": flop,
        "bytes": nbytes,
        "gflops": flop / median / 1e9 if flop and median else None,
        "gbps": nbytes / median / 1e9 if nbytes and median else None,
    }


def profile_backend(name: str, ids, params, *, causal: bool, repeats: int, margin: float) -> dict:
    """Profile one backend; a dict of the documented fields. Raises whatever the backend raises on first use."""
    import gc

    import fastattn

    from .. import _backends
    from . import timing as _timing

    clock = _timing.clock
    start = clock()
    kern = _backends.kernels(name)
    import_s = clock() - start
    pipe = _Pipeline(kern, ids, params, causal)

    # First calls: the pipeline once, stage by stage (compilation happens here), then each alternative.
    st = pipe.new_state()
    first = dict(zip([n for n, _ in STAGES], pipe.run_timed(st, clock), strict=True))
    forward = lambda: fastattn.forward(ids, params, is_causal=causal, backend=name)  # noqa: E731
    alt_calls = {
        "fused_attention": lambda: pipe.fused_attention(st),
        "embed_positions": lambda: pipe.embed_positions(st),
        "forward": forward,
    }
    alt_first = {}
    for alt, call in alt_calls.items():
        t0 = clock()
        call()
        alt_first[alt] = clock() - t0

    stage_samples = {n: [] for n, _ in STAGES}
    total_samples: list[float] = []
    alt_samples = {alt: [] for alt in alt_calls}

    def timed_stages():
        s = pipe.new_state()
        for stage, t in zip(stage_samples, pipe.run_timed(s, clock), strict=True):
            stage_samples[stage].append(t)

    def whole():
        s = pipe.new_state()
        t0 = clock()
        pipe.run(s)
        total_samples.append(clock() - t0)

    def alternative(alt):
        call = alt_calls[alt]

        def timed():
            t0 = clock()
            call()
            alt_samples[alt].append(clock() - t0)

        return timed

    tasks = [timed_stages, whole] + [alternative(alt) for alt in alt_calls]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):  # interleaved, the order rotated each round
            shift = r % len(tasks)
            for task in tasks[shift:] + tasks[:shift]:
                task()
    finally:
        if gc_was_enabled:
            gc.enable()

    work = pipe.work(params.embedding.dtype.itemsize)
    stats = {n: _timing.summarise(v) for n, v in stage_samples.items()}
    stage_sum = sum(s.median for s in stats.values())
    total = _timing.summarise(total_samples)
    stages = []
    for stage, kernel in STAGES:
        s = stats[stage]
        stages.append(
            {
                "stage": stage,
                "kernel": kernel,
                "median_s": s.median,
                "p25_s": s.p25,
                "p75_s": s.p75,
                "min_s": s.min,
                "first_call_s": first[stage],
                "share": s.median / stage_sum if stage_sum else None,
                **_rates(work[stage], s.median),
            }
        )
    alternatives = []
    for alt, kernel, replaces in ALTERNATIVES:
        s = _timing.summarise(alt_samples[alt])
        replaced = sum(stats[r].median for r in replaces) if alt != "forward" else total.median
        alternatives.append(
            {
                "name": alt,
                "kernel": kernel,
                "replaces": list(replaces),
                "median_s": s.median,
                "p25_s": s.p25,
                "p75_s": s.p75,
                "first_call_s": alt_first[alt],
                "replaced_s": replaced,
                "speedup": replaced / s.median if s.median else None,
                **_rates(work[alt], s.median),
            }
        )
    by_alt = {a["name"]: a for a in alternatives}
    fused_estimate = (
        total.median
        - by_alt["fused_attention"]["replaced_s"]
        + by_alt["fused_attention"]["median_s"]
        - by_alt["embed_positions"]["replaced_s"]
        + by_alt["embed_positions"]["median_s"]
    )
    first_calls = sum(first.values()) + sum(alt_first.values())
    steady = {**{n: stats[n].median for n in stats}, **{a["name"]: a["median_s"] for a in alternatives}}
    compile_s = sum(max(0.0, first[n] - steady[n]) for n in first) + sum(
        max(0.0, alt_first[a] - steady[a]) for a in alt_first
    )
    deviation = stage_sum / total.median - 1.0
    backward = _profile_backward(kern, pipe, st, repeats)
    phases = _fused_phases(name, kern, pipe, st, repeats)
    return {
        "backend": name,
        "status": "ok",
        "reason": None,
        "import_s": import_s,
        "first_calls_s": first_calls,
        "compile_s": compile_s,
        "stages": stages,
        "stage_sum_s": stage_sum,
        "total_s": total.median,
        "total_p25_s": total.p25,
        "total_p75_s": total.p75,
        "sum_vs_total": deviation,
        "total_min_s": total.min,
        "stage_min_sum_s": sum(st.min for st in stats.values()),
        "min_sum_vs_total": sum(st.min for st in stats.values()) / total.min - 1.0,
        "margin": margin,
        "within_margin": abs(deviation) <= margin,
        "alternatives": alternatives,
        "fused_pipeline_estimate_s": fused_estimate,
        "backward": backward,
        "fused_phases": phases,
    }


def _fused_phases(name: str, kern, pipe, st, repeats: int) -> dict:
    """Inside the fused forward: the clock ticks of its phases (tile products, softmax pass, fold), summed over the
    threads, from the kernel's own counters (the Cython backend's ``phase_profile``). The Numba kernels have no
    counters (``available`` False, with the reason); they run the same algorithm."""
    import math

    from .. import _call

    counters = getattr(kern, "phase_profile", None)
    if counters is None:
        return {"available": False, "reason": f"the {name} kernels have no phase counters", "phases": []}
    d = pipe.shape[4]
    counters(True)
    try:
        for _ in range(repeats):
            _call.attention(kern, st.q, st.k, st.v, 1.0 / math.sqrt(d), pipe.causal)
    finally:
        ticks = counters(False)
    total = sum(ticks.values())
    phases = [{"phase": p, "ticks": t, "share": t / total if total else None} for p, t in ticks.items()]
    return {"available": True, "reason": None, "phases": phases, "calls": repeats}


def _profile_backward(kern, pipe, st, repeats: int) -> dict:
    """The attention backward stage by stage and fused, from the forward state ``st`` of the pipeline."""
    import math

    import numpy as np

    from .. import _call
    from . import timing as _timing

    clock = _timing.clock
    B, N, _, H, d = pipe.shape
    q, k, v = st.q, st.k, st.v
    dt = q.dtype
    scale = 1.0 / math.sqrt(d)
    causal = pipe.causal
    s = _call.scores(kern, q, k, scale, causal)  # the forward's saved arrays (made outside the timer)
    p = np.empty_like(s)
    kern.softmax(p.reshape(-1, N), s.reshape(-1, N))
    out, lse = _call.attention(kern, q, k, v, scale, causal, want_lse=True)
    grad_out = np.random.default_rng(0).standard_normal(out.shape).astype(dt)
    grad_p, grad_s = np.empty_like(s), s  # dS overwrites the scores, which are no longer needed
    gq, gk, gv = (np.empty_like(q) for _ in range(3))
    steps = {
        "weighted_sum_backward": lambda: kern.weighted_sum_backward(grad_p, gv, grad_out, p, v),
        "softmax_backward": lambda: kern.softmax_backward(
            grad_s.reshape(-1, N), grad_p.reshape(-1, N), p.reshape(-1, N)
        ),  # fmt: skip
        "scores_backward": lambda: kern.scores_backward(gq, gk, grad_s, q, k, scale),
    }

    def fused():
        _call.attention_backward_into(kern, gq, gk, gv, grad_out, q, k, v, out, lse, scale, causal)

    def timed(fn):
        t0 = clock()
        fn()
        return clock() - t0

    first = {name: timed(fn) for name, fn in steps.items()}
    fused_first = timed(fused)
    samples = {name: [] for name in steps}
    fused_samples = []
    for r in range(repeats):  # interleaved: the stages, then the fused kernel (the order swapped each round)
        order = ["stages", "fused"] if r % 2 == 0 else ["fused", "stages"]
        for what in order:
            if what == "fused":
                fused_samples.append(timed(fused))
            else:
                for name, fn in steps.items():
                    samples[name].append(timed(fn))
    attn = 2.0 * B * H * N * N * d * (0.5 if causal else 1.0)  # one N x N x d product
    work = {
        "weighted_sum_backward": (2 * attn, None),
        "softmax_backward": (None, 3.0 * B * H * N * N * dt.itemsize),
        "scores_backward": (2 * attn, None),
        "fused_attention_backward": (2.5 * 2 * attn, None),
    }
    stats = {name: _timing.summarise(v) for name, v in samples.items()}
    stage_sum = sum(x.median for x in stats.values())
    stages = []
    for stage, kernel in BACKWARD_STAGES:
        x = stats[stage]
        share = x.median / stage_sum if stage_sum else None
        stages.append({"stage": stage, "kernel": kernel, "median_s": x.median, "p25_s": x.p25, "p75_s": x.p75,
                       "min_s": x.min, "first_call_s": first[stage], "share": share,
                       **_rates(work[stage], x.median)})  # fmt: skip
    f = _timing.summarise(fused_samples)
    return {
        "stages": stages,
        "stage_sum_s": stage_sum,
        "fused": {
            "name": "fused_attention_backward",
            "kernel": "attention_backward",
            "replaces": [n for n, _ in BACKWARD_STAGES],
            "median_s": f.median,
            "p25_s": f.p25,
            "p75_s": f.p75,
            "first_call_s": fused_first,
            "replaced_s": stage_sum,
            "speedup": stage_sum / f.median if f.median else None,
            **_rates(work["fused_attention_backward"], f.median),
        },  # fmt: skip
    }


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def format_report(doc: dict) -> str:
    from . import timing as _timing
    from .timing import format_rate, format_seconds

    p = doc["params"]
    lines = [
        f"fastattn profile: B={p['batch']} N={p['seq_len']} D={p['d_model']} H={p['heads']} (d={p['head_dim']}) "
        f"V={p['vocab']} {p['dtype']} {'causal' if p['causal'] else 'full'}; threads {doc['threads']['fastattn']}; "
        f"{p['repeats']} rounds",
        f"measured on: {_timing.machine_line(doc['machine'], doc['threads'].get('fastattn'))}"
        + (f"; float32 matmul rate of this run {doc['peak']['gflops']:.0f} GFLOP/s" if doc.get("peak") else ""),
        "stage times: medians over the rounds of the stage pipeline, each kernel called as fastattn.forward calls it",
    ]
    for b in doc["backends"]:
        lines.append("")
        if b["status"] != "ok":
            lines.append(f"backend {b['backend']}: skipped: {b['reason']}")
            continue
        lines.append(
            f"backend {b['backend']}: import {format_seconds(b['import_s'])}; first calls "
            f"{format_seconds(b['first_calls_s'])} in all, of which about {format_seconds(b['compile_s'])} "
            "above steady state (compilation or loading the on-disk cache)"
        )
        head = f"  {'stage':<16} {'kernel':<22} {'median':>10} {'share':>7} {'achieved':>14} {'first call':>11}"
        lines += [head, "  " + "-" * (len(head) - 2)]

        def rate(r):
            if r["gflops"] is not None:
                return format_rate(r["gflops"], "GFLOP/s")
            return format_rate(r["gbps"], "GB/s")

        for s in b["stages"]:
            lines.append(
                f"  {s['stage']:<16} {s['kernel']:<22} {format_seconds(s['median_s']):>10} "
                f"{100 * s['share']:>6.1f}% {rate(s):>14} {format_seconds(s['first_call_s']):>11}"
            )
        lines.append(f"  {'sum of stages':<39} {format_seconds(b['stage_sum_s']):>10} {100.0:>6.1f}%")
        verdict = "within" if b["within_margin"] else "OUTSIDE"
        lines.append(
            f"  {'measured pipeline':<39} {format_seconds(b['total_s']):>10}   sum is {100 * b['sum_vs_total']:+.1f}% "
            f"of it: {verdict} the {100 * b['margin']:.0f}% margin (by minimums: {100 * b['min_sum_vs_total']:+.1f}%)"
        )
        lines.append("  alternatives, timed in the same rounds:")
        for a in b["alternatives"]:
            what = "the public forward pass" if a["name"] == "forward" else "instead of " + " + ".join(a["replaces"])
            lines.append(
                f"  {a['name']:<16} {a['kernel']:<22} {format_seconds(a['median_s']):>10} {'':>7} {rate(a):>14} "
                f"{format_seconds(a['first_call_s']):>11}  {what} ({format_seconds(a['replaced_s'])}: "
                f"{a['speedup']:.2f}x)"
            )
        lines.append(
            f"  {'pipeline with both fused kernels, estimated':<39}  {format_seconds(b['fused_pipeline_estimate_s'])}"
        )
        bw = b["backward"]
        lines.append("  backward of the attention, from the forward's saved arrays:")
        for s in bw["stages"]:
            lines.append(
                f"  {s['stage']:<16} {s['kernel']:<22} {format_seconds(s['median_s']):>10} "
                f"{100 * s['share']:>6.1f}% {rate(s):>14} {format_seconds(s['first_call_s']):>11}"
            )
        lines.append(f"  {'sum of backward stages':<39} {format_seconds(bw['stage_sum_s']):>10} {100.0:>6.1f}%")
        a = bw["fused"]
        lines.append(
            f"  {'fused backward':<16} {a['kernel']:<22} {format_seconds(a['median_s']):>10} {'':>7} {rate(a):>14} "
            f"{format_seconds(a['first_call_s']):>11}  instead of the three ({a['speedup']:.2f}x)"
        )
        ph = b["fused_phases"]
        if not ph["available"]:
            lines.append(f"  inside the fused attention: {ph['reason']}")
            continue
        lines.append(f"  inside the fused attention (its phase counters, {ph['calls']} calls, all threads):")
        for x in ph["phases"]:
            lines.append(f"  {x['phase']:<39} {'':>10} {100 * (x['share'] or 0):>6.1f}%")
    return "\n".join(lines)


def _command_line() -> str | None:
    import shlex

    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        return "python -m fastattn " + shlex.join(sys.argv[1:])
    return None


def run(args) -> int:
    import numpy as np

    import fastattn

    from .. import _backends
    from . import timing as _timing

    if args.d_model % args.heads:
        print(f"profile: --d-model ({args.d_model}) must be a multiple of --heads ({args.heads})", file=sys.stderr)
        return 2
    status = _timing.backend_reasons()
    if args.backends is None:
        names = [b for b in _backends.PREFERENCE if b != "numpy" and status[b] is None] or ["numpy"]
    elif "all" in args.backends:
        names = [b for b in _backends.PREFERENCE]
    else:
        names = list(dict.fromkeys(args.backends))

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq_len), dtype=np.int64)
    params = fastattn.init_params(
        args.vocab, args.d_model, args.heads, max_positions=args.seq_len, seed=args.seed, dtype=args.dtype
    )
    causal = args.mask == "causal"
    results = []
    try:
        pinned = _timing.pin_threads(args.threads)
        threads = pinned.__enter__()
    except ValueError as exc:  # e.g. more threads than NUMBA_NUM_THREADS allows
        print(f"profile: cannot use --threads {args.threads}: {exc}", file=sys.stderr)
        return 2
    try:
        for name in names:
            if status.get(name) is not None:
                reason = status[name]
            else:
                print(f"profile: {name} ...", file=sys.stderr, flush=True)
                try:
                    results.append(
                        profile_backend(name, ids, params, causal=causal, repeats=args.repeats, margin=args.margin)
                    )
                    continue
                except Exception as exc:  # a backend still being written: report it, profile the others
                    reason = f"raised on first use: {_timing.first_use_error(exc)}"
            print(f"profile: skipping backend {name}: {reason}", file=sys.stderr, flush=True)
            results.append({"backend": name, "status": "skipped", "reason": reason})
        peak = _timing.matmul_peak("float32", use_torch=False)  # the reference rate of this run
        machine = _timing.machine_info()  # inside the pinned threads: the count and plans of the run
    finally:
        pinned.__exit__(None, None, None)

    doc = {
        "schema": SCHEMA,
        "peak": peak,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "machine": machine,
        "threads": threads,
        "params": {
            "batch": args.batch,
            "seq_len": args.seq_len,
            "d_model": args.d_model,
            "heads": args.heads,
            "head_dim": args.d_model // args.heads,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "causal": causal,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "margin": args.margin,
        "backends": results,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_report(doc))
    return 0 if any(b["status"] == "ok" for b in results) else 1
