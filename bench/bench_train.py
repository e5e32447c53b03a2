"""One GPT-2 training step on fastattn, beside transformers + torch.optim.AdamW, in one process.

The target of issue 14: a step (forward, backward, AdamW) of a 6-layer, 384-wide GPT-2 (6 heads, FFN 1536) with a
16,384-token vocabulary on a batch of 8 x 256 tokens, 2 threads: fastattn at least 1.25x PyTorch. Both sides start
from the same random weights (built with transformers, saved with ``save_pretrained``, loaded with
``fastattn.models.load``); before timing, the first step's losses are checked to agree. Rounds alternate between the
two sides and the median of each is reported, with the share of the step each part takes:

- fastattn: forward (blocks, saving activations), loss head (logits, fused cross-entropy and their gradients a
  tile of rows at a time), backward (the blocks in reverse, embeddings), clip + AdamW;
- PyTorch: forward (with the loss), ``loss.backward()``, ``clip_grad_norm_`` + ``AdamW.step()``.

Run (on a shared machine, under the lock)::

    flock /tmp/fastattn-bench.lock python bench/bench_train.py --threads 2 [--rounds 3] [--grid quick]

Grids: ``full`` (the target), ``quick`` (2 layers, vocabulary 4096, 4 x 128), ``smoke``. Needs transformers and
torch; exits with a message without them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Two OpenMP runtimes share the process (PyTorch's and the kernels'): passive waiting for both (see bench_models.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

GRIDS = {  # (layers, width, heads, vocabulary, positions), (batch, seq_len)
    "full": ((6, 384, 6, 16384, 256), (8, 256)),
    "quick": ((2, 384, 6, 4096, 128), (4, 128)),
    "smoke": ((2, 32, 4, 100, 32), (2, 16)),
}


def build(path: str, model_shape) -> None:
    import torch
    import transformers

    layers, width, heads, vocab, positions = model_shape
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                                  n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as exc:
        print(f"bench_train needs torch and transformers: {exc}")
        return 1
    from threadpoolctl import threadpool_limits

    import fastattn
    import fastattn.models
    from fastattn.models import _train
    from fastattn.optim import AdamW, clip_grad_norm

    torch.set_num_threads(args.threads)
    fastattn.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    model_shape, (B, L) = GRIDS[args.grid]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model_shape[3], (B, L))
    with tempfile.TemporaryDirectory() as path:
        build(path, model_shape)
        ours = fastattn.models.load(path, backend=args.backend)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(path).train()
    opt = AdamW(ours.parameters(), lr=1e-4)
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    tids = torch.tensor(ids)

    def step_ours():
        t = {}
        start = time.perf_counter()
        batch = _train.check_batch(ours.config, ids, None, None)
        loss, grads = _train.loss_and_grads(ours, *batch, args.backend, timings=t)
        mid = time.perf_counter()
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        t["clip + AdamW"] = time.perf_counter() - mid
        return loss, time.perf_counter() - start, t

    def step_torch():
        start = time.perf_counter()
        topt.zero_grad(set_to_none=True)
        loss = theirs(tids, labels=tids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        topt.step()
        t3 = time.perf_counter()
        return loss.item(), t3 - start, {"forward + loss": t1 - start, "backward": t2 - t1, "clip + AdamW": t3 - t2}

    first_ours, _, _ = step_ours()  # also compiles (or loads from the cache) the kernels
    first_torch, _, _ = step_torch()
    print(f"first-step loss: fastattn {first_ours:.6f}, PyTorch {first_torch:.6f}")
    if abs(first_ours - first_torch) > 1e-4 * abs(first_torch):
        print("the two sides disagree: not timing")
        return 1
    times = {"fastattn": [], "torch": []}
    parts = {"fastattn": [], "torch": []}
    for _ in range(args.rounds):
        for side, fn in (("fastattn", step_ours), ("torch", step_torch)):
            _, total, t = fn()
            times[side].append(total)
            parts[side].append(t)
    layers, width, heads, vocab, _ = model_shape
    print(f"GPT-2 {layers} x {width} ({heads} heads), vocabulary {vocab}, batch {B} x {L} tokens, "
          f"{args.threads} threads, backend {args.backend}, median of {args.rounds} rounds")  # fmt: skip
    medians = {side: statistics.median(v) for side, v in times.items()}
    for side, label in (("fastattn", f"fastattn ({args.backend})"), ("torch", f"PyTorch {torch.__version__}")):
        med = medians[side]
        share = {k: statistics.median(p[k] for p in parts[side]) for k in parts[side][0]}
        split = ", ".join(f"{k} {100 * v / med:.0f}%" for k, v in share.items())
        print(f"  {label:22s} {med:7.3f} s/step  {B * L / med:8,.0f} tokens/s   ({split})")
    print(f"  speed-up: {medians['torch'] / medians['fastattn']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
