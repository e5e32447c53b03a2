"""``python -m fastattn demo``: the founding note's sentence through the forward pass, on every backend."""

from __future__ import annotations

import statistics
import time

import numpy as np

HELP = "run 'The dog chased the black cat through the garden' through the forward pass on every backend"
SENTENCE = "The dog chased the black cat through the garden"
VOCAB = ["<pad>", "<unk>", "the", "dog", "chased", "black", "cat", "through", "garden"]


def tokenize(text: str) -> list[int]:
    index = {word: i for i, word in enumerate(VOCAB)}
    return [index.get(word, index["<unk>"]) for word in text.lower().split()]


def add_arguments(parser) -> None:
    parser.add_argument("--sentence", default=SENTENCE, help="text to run (words outside the toy vocabulary -> <unk>)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--causal", action="store_true", help="decoder-style causal attention")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per backend")
    parser.add_argument("--seed", type=int, default=0)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    import fastattn
    from fastattn import oracle

    words = args.sentence.split()
    ids = np.array([tokenize(args.sentence)])  # (1, N)
    N = ids.shape[1]
    params = fastattn.init_params(len(VOCAB), args.d_model, args.heads, max_positions=max(64, N), seed=args.seed)
    H, D = args.heads, args.d_model
    d = D // H
    print(f"sentence : {args.sentence!r}")
    print(f"token ids: {ids.tolist()}  (toy vocabulary of {len(VOCAB)} words)")
    print(f"\nshapes along the forward pass (B=1, N={N}, D={D}, H={H}, d={d}):")
    x = oracle.embed(ids, params.embedding)
    print(f"  1. embedding   one-hot (1, {N}, {len(VOCAB)}) @ table {params.embedding.shape} -> X {x.shape}")
    x = oracle.add_positions(x, params.positions)
    print(f"  2. positions   X + PE[:{N}] {params.positions[:N].shape} -> {x.shape}")
    q = oracle.split_heads(x @ params.w_q, H)
    k = oracle.split_heads(x @ params.w_k, H)
    mask = oracle._additive(oracle.causal_mask(N, N), x.dtype) if args.causal else None
    a = oracle.attention_weights(q, k, 1.0 / np.sqrt(d), mask)
    print(f"  3. attention   Q, K, V {q.shape} -> scores / softmax {a.shape} -> heads merged, @ W_o -> ({1}, {N}, {D})")

    focus = next((i for i, w in enumerate(words) if w.lower() == "black"), N // 2)
    weights = a[0, :, focus, :].mean(axis=0)  # (N,) averaged over heads
    print(f"\nattention of {words[focus]!r} over the sentence (mean over {H} heads):")
    for word, w in zip(words, weights, strict=True):
        print(f"  {word:>10s} {w:6.3f} {'#' * int(round(w * 60))}")

    truth = oracle.forward(ids.astype(np.int64), params, is_causal=args.causal)
    print(f"\n{'backend':<8} {'max |err| vs oracle':>20} {'first call':>12} {'median call':>12}")
    failed = False
    for name in fastattn.available_backends():
        start = time.perf_counter()
        out = fastattn.forward(ids, params, is_causal=args.causal, backend=name)
        first = time.perf_counter() - start
        err = float(np.max(np.abs(out - truth)))
        tol = 1e-4 if out.dtype == np.float32 else 1e-10
        failed |= not err <= tol
        median = _median_time(
            lambda name=name: fastattn.forward(ids, params, is_causal=args.causal, backend=name), args.repeats
        )
        status = "ok" if err <= tol else "MISMATCH"
        print(f"{name:<8} {err:>17.2e} {status:>2} {first * 1e3:>10.1f}ms {median * 1e6:>10.1f}us")
    for name, reason in fastattn.backend_status().items():
        if reason is not None:
            print(f"{name:<8} unavailable: {reason}")
    return 1 if failed else 0
