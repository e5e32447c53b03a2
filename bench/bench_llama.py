"""A Llama of SmolLM2-135M's shape on fastattn beside Hugging Face transformers, in one process.

The model: 30 layers, 576 wide, 9 query and 3 key/value heads (head dim 64), SwiGLU FFN 1536, vocabulary 49,152,
tied embeddings, random weights (``torch.manual_seed(0)``, normal(0, 0.02)), float32. fastattn's model is built
from the same tensors (``LlamaModel.from_tensors``), so nothing is downloaded or written, and its logits are checked
against transformers' (within 1e-5 of their scale) before anything is timed.

Measured (best of ``--repeats`` runs each, interleaved):

- prefill: logits of a 256-token prompt at batch 1 (``model(ids)`` on both sides);
- decode: greedy generation of 64 tokens after a 32-token prompt, at batch 1 and 8; decode tokens/s counts the 63
  steps after the first token (transformers: the time of ``generate(64)`` minus that of ``generate(1)``);
- the memory-bandwidth limit of decoding: every step reads all the weights once (the layers and the tied LM head),
  so at most ``copy rate / weight bytes`` steps per second (times the batch in tokens); the copy rate is that of
  ``np.copyto`` over a 512 MiB array (bytes read plus bytes written, per second) measured in the same run;
- fastattn's decode at batch 1 on 1 and on 2 threads (the kernels' and BLAS's);
- prefill once more with NumPy's OpenBLAS held to one thread (fastattn's kernels on ``--threads``): on a busy
  machine OpenBLAS's threads wait for cores that other processes hold (the load average is printed).

Targets (issue 15): decode >= 2x transformers' tokens/s at batch 1 and >= 1.25x at batch 8 and in prefill.

    flock /tmp/fastattn-bench.lock python bench/bench_llama.py --threads 2 [--backend numba] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two OpenMP runtimes in one process: see bench_models.py

import numpy as np  # noqa: E402

SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=100000.0,
)  # fmt: skip


def copy_rate(nbytes=512 << 20, repeats=3) -> float:
    """Bytes per second that ``np.copyto`` moves over a large array, counting what it reads and what it writes
    (2 x nbytes): the memory bandwidth at hand."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def best_of(fn, repeats):
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=None, help="fastattn backend (default: automatic)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer layers: a quick run")
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError:
        print("bench_llama needs torch and transformers", file=sys.stderr)
        return 2
    from threadpoolctl import threadpool_limits

    import fastattn
    from fastattn.models import LlamaModel

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    fastattn.set_num_threads(args.threads)
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = LlamaModel.from_tensors(hf.config.to_dict(), state, backend=args.backend)
    backend = args.backend or fastattn.available_backends()[0]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, shape["vocab_size"], (1, 256))
    with torch.no_grad():
        ref = hf(torch.from_numpy(prompt[:, :64])).logits.numpy()
    got = ours(prompt[:, :64]).logits
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= 1e-5, f"fastattn's logits differ from transformers' by {err:.2e} of their scale"

    weight_bytes = sum(a.nbytes for k, a in state.items() if k != "lm_head.weight")  # tied head: the embedding
    rate = copy_rate()
    print(f"# Llama {args.layers} layers x 576 (SmolLM2-135M's shape), float32, {args.threads} threads, "
          f"fastattn backend {backend}; logits agree to {err:.1e} of their scale")  # fmt: skip
    print(f"# load average before the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"# weights {weight_bytes / 2**20:.0f} MiB; copy rate {rate / 1e9:.1f} GB/s -> decode limit "
          f"{rate / weight_bytes:.1f} steps/s")  # fmt: skip
    rows = []

    def hf_prefill():
        with torch.no_grad():
            hf(torch.from_numpy(prompt))

    t_hf, _ = best_of(hf_prefill, args.repeats)
    t_fa, _ = best_of(lambda: ours(prompt), args.repeats)
    rows.append(("prefill 256, batch 1", 256 / t_hf, 256 / t_fa, None))
    with threadpool_limits(1):  # NumPy's OpenBLAS on one thread, fastattn's kernels on --threads
        t_fa1, _ = best_of(lambda: ours(prompt), args.repeats)
    rows.append(("  the same, OpenBLAS 1 thread", 256 / t_hf, 256 / t_fa1, None))

    for batch in (1, 8):
        ids = rng.integers(0, shape["vocab_size"], (batch, 32))

        def hf_generate(n, ids=ids):
            with torch.no_grad():
                return hf.generate(torch.from_numpy(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)  # fmt: skip

        hf_generate(2)  # warm up
        t_one, _ = best_of(lambda: hf_generate(1), args.repeats)
        t_all, ref_seq = best_of(lambda: hf_generate(64), args.repeats)
        hf_decode = batch * 63 / max(t_all - t_one, 1e-9)
        fa_decode = 0.0
        for _ in range(args.repeats):
            out = ours.generate(ids, max_new_tokens=64, eos_token_id=None)
            fa_decode = max(fa_decode, out.decode_tokens_per_second)
        same = np.array_equal(out.sequences, ref_seq.numpy())
        limit = batch * rate / weight_bytes
        rows.append((f"decode 64, batch {batch}" + ("" if same else " (tokens differ!)"), hf_decode, fa_decode, limit))

    print(f"{'':28s} {'transformers':>14s} {'fastattn':>10s} {'ratio':>7s} {'fastattn / bandwidth limit':>28s}")
    for name, a, b, limit in rows:
        share = f"{b / limit:.0%} of {limit:.1f}" if limit else ""
        print(f"{name:28s} {a:11.1f} t/s {b:7.1f} t/s {b / a:6.2f}x {share:>28s}")

    ids = rng.integers(0, shape["vocab_size"], (1, 32))
    scaling = []
    for n in (1, args.threads):
        with fastattn.set_num_threads(n), threadpool_limits(n):
            best = max(ours.generate(ids, max_new_tokens=64, eos_token_id=None).decode_tokens_per_second
                       for _ in range(args.repeats))  # fmt: skip
        scaling.append((n, best))
    print("# fastattn decode at batch 1: " + ", ".join(f"{n} thread(s) {t:.1f} t/s" for n, t in scaling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
