"""Real checkpoints: a BERT encoder and GPT-2 greedy decoding on fastattn's backends, beside Hugging Face transformers.

The targets of issue 7, measured side by side in one process:

- encoder: 6 layers, 384 wide, 12 heads, FFN 1536 (all-MiniLM-L6-v2's shape), a batch of 32 sequences of 128
  tokens, 2 threads: at least as fast as transformers (1.25x is the goal);
- decoder: greedy decoding with the KV cache on a small GPT-2 (6 layers, 384 wide, 6 heads, vocabulary 16384),
  a 32-token prompt and 64 new tokens: at least transformers' tokens/s.

The checkpoints are random (``torch.manual_seed(0)``), built with transformers and saved with
``save_pretrained(safe_serialization=True)`` into a temporary folder, so nothing is downloaded. Before timing, each
fastattn result is checked against transformers (hidden states within 1e-5 of their scale, identical generations).

Run the comparison (interleaved rounds, a table)::

    python bench/bench_models.py --threads 2                 # the targets' grid
    python bench/bench_models.py --grid quick                # smaller, faster

or as pytest-benchmark groups with the other suites::

    python -m pytest bench/bench_models.py --benchmark-enable --bench-threads 2 [--bench-grid quick]

Grids (``--grid`` / ``--bench-grid`` / ``FASTATTN_BENCH_GRID``): ``full`` (the targets), ``quick``, ``smoke`` (tiny,
to check that the suite runs). Needs transformers and torch; skips (pytest) or exits with a message without them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# Two OpenMP runtimes share this process: PyTorch's own and the one of fastattn's kernels. With the default
# (active) wait policy, each one's idle threads spin after a call and take the 2 cores from the other's next call:
# measured here, fastattn's encoder went from 0.56 s alone to 0.76 s beside transformers. Passive waiting for both,
# unless the user chose, is fair to both sides (transformers was faster with it too: 0.59 s against 0.66 s).
# It must be set before torch (or any OpenMP runtime) loads, hence here, before any import that may load one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

GRID = os.environ.get("FASTATTN_BENCH_GRID", "full")
SEED = 0

#: Encoder shapes: model (layers, width, heads, FFN, vocabulary, positions) and batch (B, N, padded share).
ENCODER = {
    "full": {"model": (6, 384, 12, 1536, 30522, 512), "batches": [(32, 128, 0.0), (32, 128, 0.25)]},
    "quick": {"model": (6, 384, 12, 1536, 30522, 512), "batches": [(8, 128, 0.0)]},
    "smoke": {"model": (2, 32, 4, 64, 100, 64), "batches": [(2, 16, 0.25)]},
}
#: Decoder shapes: model (layers, width, heads, vocabulary, positions) and runs (batch, prompt, new tokens).
DECODER = {
    "full": {"model": (6, 384, 6, 16384, 512), "runs": [(1, 32, 64), (8, 32, 64)]},
    "quick": {"model": (6, 384, 6, 16384, 512), "runs": [(1, 32, 16)]},
    "smoke": {"model": (2, 32, 4, 100, 64), "runs": [(2, 8, 4)]},
}
BACKENDS = ["numba", "cython", "numpy"]
PEER = "transformers"


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and inputs (built outside any timed code)
# --------------------------------------------------------------------------------------------------------------
def build_encoder(directory, grid):
    """Save a random BERT of the grid's shape into ``directory``; return the transformers model."""
    import torch
    import transformers

    layers, width, heads, ffn, vocab, positions = ENCODER[grid]["model"]
    torch.manual_seed(SEED)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def build_decoder(directory, grid):
    """Save a random GPT-2 (no end-of-text id, so every run generates all its tokens) into ``directory``."""
    import torch
    import transformers

    layers, width, heads, vocab, positions = DECODER[grid]["model"]
    torch.manual_seed(SEED)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def encoder_batch(B, N, padded, vocab):
    """Token ids and an attention mask: a ``padded`` share of the sequences end early (random lengths >= N/4)."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1000 % vocab, vocab, (B, N))
    mask = np.ones((B, N), np.int64)
    for b in np.flatnonzero(rng.random(B) < padded):
        mask[b, rng.integers(N // 4, N) :] = 0
    ids[mask == 0] = 0
    return ids, mask


def encoder_contenders(directory, hf_model, B, N, padded, backends):
    """(name, fn) pairs computing the last hidden state of one batch, and the check of each against transformers."""
    import torch

    import fastattn.models

    vocab = hf_model.config.vocab_size
    ids, mask = encoder_batch(B, N, padded, vocab)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def peer():
        with torch.inference_mode():
            return hf_model(t_ids, attention_mask=t_mask).last_hidden_state

    ref = peer().numpy()
    out = [(PEER, peer, None)]
    for backend in backends:
        model = fastattn.models.load(directory, backend=backend)

        def fn(model=model):
            return model(ids, attention_mask=mask).last_hidden_state

        got = fn()  # first call: compiles, and is the check
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        out.append((backend, fn, err))
    return out


def embedding_contenders(directory, hf_model, B, N, padded, backends):
    """Sentence embeddings of one batch (mean pooling over the real tokens, L2-normalised, as sentence-transformers
    does): transformers' forward pass and the pooling in torch, against fastattn's ``encode`` (its per-text
    matmuls skip the padding, see ``BertModel.encode``); each checked against transformers'."""
    import torch

    import fastattn.models

    ids, mask = encoder_batch(B, N, padded, hf_model.config.vocab_size)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def peer():
        with torch.inference_mode():
            hidden = hf_model(t_ids, attention_mask=t_mask).last_hidden_state
            m = t_mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    ref = peer().numpy()
    out = [(PEER, peer, None)]
    for backend in backends:
        model = fastattn.models.load(directory, backend=backend)

        def fn(model=model):
            return model.encode(ids, attention_mask=mask, pooling="mean", normalize=True)

        err = float(np.abs(fn() - ref).max())  # unit vectors: absolute is relative
        out.append((backend, fn, err))
    return out


def decoder_contenders(directory, hf_model, B, prompt, new, backends):
    """(name, fn) pairs generating ``new`` tokens greedily, and whether each equals transformers' generation."""
    import torch

    import fastattn.models

    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, hf_model.config.vocab_size, (B, prompt))
    t_ids, t_mask = torch.from_numpy(ids), torch.ones((B, prompt), dtype=torch.long)

    def peer():
        with torch.inference_mode():
            return hf_model.generate(t_ids, attention_mask=t_mask, max_new_tokens=new, do_sample=False).numpy()

    ref = peer()
    out = [(PEER, peer, None)]
    for backend in backends:
        model = fastattn.models.load(directory, backend=backend)

        def fn(model=model):
            return model.generate(ids, max_new_tokens=new).sequences

        same = bool(np.array_equal(fn(), ref))
        out.append((backend, fn, same))
    return out


# --------------------------------------------------------------------------------------------------------------
# pytest-benchmark suites (python -m pytest bench/bench_models.py --benchmark-enable)
# --------------------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the script below runs without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def checkpoints(tmp_path_factory):
        pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("safetensors")
        transformers.logging.set_verbosity_error()
        enc_dir, dec_dir = tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("gpt2")
        return {
            "encoder": (str(enc_dir), build_encoder(enc_dir, GRID)),
            "decoder": (str(dec_dir), build_decoder(dec_dir, GRID)),
        }

    def _available(name):
        import fastattn

        if name != PEER and name not in fastattn.available_backends():
            pytest.skip(f"backend {name} unavailable: {fastattn.backend_status().get(name)}")

    @pytest.mark.parametrize("backend", [PEER, *BACKENDS])
    @pytest.mark.parametrize("batch", ENCODER[GRID]["batches"], ids=lambda b: f"B{b[0]}-N{b[1]}-pad{b[2]:g}")
    def test_encoder(measure, checkpoints, backend, batch):
        _available(backend)
        directory, hf_model = checkpoints["encoder"]
        B, N, padded = batch
        layers, width, heads, ffn, _, _ = ENCODER[GRID]["model"]
        pairs = {
            name: (fn, check)
            for name, fn, check in encoder_contenders(
                directory, hf_model, B, N, padded, [] if backend == PEER else [backend]
            )
        }
        fn, err = pairs[backend]
        if err is not None:
            assert err < 1e-5, f"{backend} disagrees with transformers: {err:.2e}"
        flop = 2 * B * N * layers * (4 * width * width + 2 * width * ffn) + 4 * B * N * N * width * layers
        measure(
            fn,
            group=f"encoder L{layers}-D{width}-H{heads} B{B}-N{N} pad{padded:g}",
            backend="torch" if backend == PEER else backend,
            role="peer" if backend == PEER else "fastattn",
            flop=flop,
        )

    @pytest.mark.parametrize("backend", [PEER, *BACKENDS])
    @pytest.mark.parametrize("run", DECODER[GRID]["runs"], ids=lambda r: f"B{r[0]}-prompt{r[1]}-new{r[2]}")
    def test_generate(measure, checkpoints, backend, run):
        _available(backend)
        directory, hf_model = checkpoints["decoder"]
        B, prompt, new = run
        layers, width, heads, _, _ = DECODER[GRID]["model"]
        pairs = {
            name: (fn, same)
            for name, fn, same in decoder_contenders(
                directory, hf_model, B, prompt, new, [] if backend == PEER else [backend]
            )
        }
        fn, same = pairs[backend]
        if same is not None:
            assert same, f"{backend} generated other tokens than transformers"
        measure(
            fn,
            group=f"gpt2 generate L{layers}-D{width}-H{heads} B{B} prompt{prompt} new{new}",
            backend="torch" if backend == PEER else backend,
            role="peer" if backend == PEER else "fastattn",
            tokens=B * new,
        )


# --------------------------------------------------------------------------------------------------------------
# The side-by-side script
# --------------------------------------------------------------------------------------------------------------
def _table(title, rows, unit):
    print(f"\n{title}")
    print(f"  {'':<14}{'median':>12}{'spread':>9}{unit:>14}{'vs ' + PEER:>18}   check")
    peer = next((r for r in rows if r[0] == PEER), None)
    for name, stats, rate, check in rows:
        ratio = "" if peer is None or name == PEER else f"{peer[1].median / stats.median:.2f}x"
        print(f"  {name:<14}{stats.median * 1e3:>10.1f}ms{stats.spread:>8.0%}{rate:>14}{ratio:>18}   {check}")


def _measure_table(title, pairs, args, rate, err_unit):
    """Time (name, fn, err) pairs interleaved and print their table; ``rate(seconds)`` is the throughput column."""
    from fastattn.tools import timing as _timing

    contenders = [_timing.Contender(name, fn) for name, fn, _ in pairs]
    _timing.run_interleaved(contenders, rounds=args.rounds, budget_s=args.budget, min_rounds=2)
    checks = {name: ("" if err is None else f"max err {err:.1e} {err_unit}".rstrip()) for name, _, err in pairs}
    rows = [(c.name, c.stats(), rate(c.stats().median), checks[c.name]) for c in contenders if c.ok]
    _table(title, rows, "throughput")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(ENCODER), default=GRID)
    parser.add_argument("--threads", type=int, default=2, help="threads for fastattn, torch and NumPy's BLAS")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (fewer for slow contenders)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of samples per contender, at most")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated fastattn backends")
    parser.add_argument("--skip", choices=("encoder", "decoder"), action="append", default=[])
    args = parser.parse_args(argv)

    from fastattn.tools import timing as _timing

    for name in ("torch", "transformers", "safetensors"):
        module, reason = _timing.optional_import(name)
        if module is None:
            print(f"bench_models needs {name}: {reason}", file=sys.stderr)
            return 2
    import transformers

    import fastattn

    transformers.logging.set_verbosity_error()
    backends = [b for b in args.backends.split(",") if b]
    missing = [b for b in backends if b not in fastattn.available_backends()]
    for b in missing:
        print(f"skipping backend {b}: {fastattn.backend_status().get(b)}")
    backends = [b for b in backends if b not in missing]
    info = _timing.machine_info()
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"machine: {info.get('cpu', '?')}, {os.cpu_count()} cores; grid {args.grid}; OMP_WAIT_POLICY={policy}")

    with tempfile.TemporaryDirectory() as tmp, _timing.pin_threads(args.threads) as threads:
        print(f"threads: {threads}")
        if "encoder" not in args.skip:
            directory = os.path.join(tmp, "bert")
            hf_model = build_encoder(directory, args.grid)
            layers, width, heads, ffn, _, _ = ENCODER[args.grid]["model"]
            for B, N, padded in ENCODER[args.grid]["batches"]:
                title = f"encoder L{layers} D{width} H{heads} FFN{ffn}, batch {B} x {N}, padded {padded:.0%}"
                pairs = encoder_contenders(directory, hf_model, B, N, padded, backends)
                _measure_table(title, pairs, args, lambda t, n=B * N: f"{n / t:,.0f} tok/s", "of scale")
                title = f"sentence embeddings (encode), batch {B} x {N}, padded {padded:.0%}"
                pairs = embedding_contenders(directory, hf_model, B, N, padded, backends)
                _measure_table(title, pairs, args, lambda t, n=B: f"{n / t:,.0f} texts/s", "")
        if "decoder" not in args.skip:
            directory = os.path.join(tmp, "gpt2")
            hf_model = build_decoder(directory, args.grid)
            layers, width, heads, vocab, _ = DECODER[args.grid]["model"]
            for B, prompt, new in DECODER[args.grid]["runs"]:
                pairs = decoder_contenders(directory, hf_model, B, prompt, new, backends)
                contenders = [_timing.Contender(name, fn) for name, fn, _ in pairs]
                _timing.run_interleaved(contenders, rounds=args.rounds, budget_s=args.budget, min_rounds=2)
                checks = {
                    name: ("" if same is None else ("identical" if same else "DIFFERENT")) for name, _, same in pairs
                }
                rows = [
                    (c.name, c.stats(), f"{B * new / c.stats().median:,.0f} tok/s", checks[c.name])
                    for c in contenders
                    if c.ok
                ]
                _table(
                    f"GPT-2 L{layers} D{width} H{heads} V{vocab}: greedy generate, batch {B}, prompt {prompt}, "
                    f"{new} new tokens",
                    rows,
                    "tokens/s",
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
