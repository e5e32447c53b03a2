"""``python -m fastattn train``: train a small byte- or character-level GPT from scratch, on fastattn's kernels.

With no ``--data`` it reads the source files of Python's own standard library (every installation has them: no
download). The text is split 90 / 10 into training and held-out parts (every tenth block of 64 Ki tokens is held
out); each step draws ``--batch`` windows of
``--seq-len`` tokens from the training part (from a generator seeded with ``(seed, step)``, so that a resumed
run draws exactly the batches an uninterrupted one would), takes one AdamW step with gradient clipping and a
warm-up + cosine schedule, and prints the progress. The held-out loss is measured every ``--eval-every`` steps on
fixed windows. At the end it writes ``--out``: the model (``config.json`` + ``model.safetensors``, loadable by
``fastattn.models.load`` and Hugging Face's ``GPT2LMHeadModel.from_pretrained``), the optimizer state and the
run's state (``optimizer.npz``, ``train_state.json``), the losses (``losses.csv``, and ``loss.png`` when
matplotlib is installed), and it samples a few lines of text. ``--resume DIR`` continues such a run.

Examples
--------
    python -m fastattn train                          # about 2 minutes on 2 cores
    python -m fastattn train --data book.txt --tokens char --steps 1000 --out book-gpt
    python -m fastattn train --resume book-gpt --steps 2000
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

HELP = "train a small byte- or character-level GPT from scratch (default text: Python's standard library)"

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.npz"
LOSSES_FILE = "losses.csv"
DEFAULT_TEXT_BYTES = 4 << 20  # the first 4 MiB of the standard library's sources, in sorted file order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n  python -m fastattn train\n  python -m fastattn train --data book.txt --tokens char"
    parser.add_argument("--data", help="a text file (default: the source files of Python's standard library)")
    parser.add_argument(
        "--tokens",
        choices=("byte", "char"),
        default="byte",
        help="byte-level (vocabulary 256) or character-level (the text's characters) (default byte)",
    )
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--width", type=int, default=128, help="hidden size n_embd (default 128)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    parser.add_argument("--steps", type=int, default=400, help="total optimizer steps of the run (default 400)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --steps)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    parser.add_argument("--threads", type=int, default=None, help="threads of the kernels and BLAS (default all)")
    parser.add_argument("--backend", default=None, help="numba, cython or numpy (default: the automatic choice)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation (default 4)")
    parser.add_argument("--out", default="fastattn-train", help="output directory (default ./fastattn-train)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its options are kept)")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (and save a resumable checkpoint) after this many steps of this invocation",
    )
    parser.add_argument("--samples", type=int, default=3, help="lines of text sampled at the end (default 3)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def default_text() -> bytes:
    """The first DEFAULT_TEXT_BYTES of the standard library's ``*.py`` files (sorted paths), concatenated."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "dist-packages" in path:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= DEFAULT_TEXT_BYTES:
            break
    return b"".join(chunks)[:DEFAULT_TEXT_BYTES]


class Codec:
    """Text <-> token ids: bytes (vocabulary 256), or the characters of the training text."""

    def __init__(self, kind: str, chars: str | None = None):
        self.kind = kind
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)} if chars is not None else None

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    def encode(self, raw: bytes) -> np.ndarray:
        if self.kind == "byte":
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        text = raw.decode("utf-8", errors="replace")
        return np.array([self.index[c] for c in text if c in self.index], dtype=np.int64)

    def decode(self, ids) -> str:
        if self.kind == "byte":
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_json(cls, d: dict) -> Codec:
        return cls(d["kind"], d.get("chars"))


def load_data(path: str | None, kind: str, codec: Codec | None = None) -> tuple[np.ndarray, Codec, str]:
    if path is None:
        raw, source = default_text(), f"Python {sys.version.split()[0]} standard library sources"
    else:
        with open(path, "rb") as f:
            raw, source = f.read(), path
    if codec is None:
        chars = "".join(sorted(set(raw.decode("utf-8", errors="replace")))) if kind == "char" else None
        codec = Codec(kind, chars)
    return codec.encode(raw), codec, source


def split_tokens(tokens: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """90% / 10%: every tenth block of ``block`` tokens is held out (so both parts sample the whole text, not its
    first and last files); a text of fewer than ten blocks is split at 90% of its length."""
    n_blocks = len(tokens) // block
    if n_blocks < 10:
        cut = int(len(tokens) * 0.9)
        return tokens[:cut], tokens[cut:]
    held = np.zeros(len(tokens), bool)
    for i in range(9, n_blocks, 10):
        held[i * block : (i + 1) * block] = True
    return tokens[~held], tokens[held]


def batch_at(tokens: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """The windows (batch, seq_len) of step ``step``: a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    return np.stack([tokens[s : s + seq_len] for s in starts])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and sampling
# ----------------------------------------------------------------------------------------------------------------
def eval_loss(model, tokens: np.ndarray, args, backend) -> float:
    """Mean next-token loss on ``eval_batches`` fixed windows of the held-out tokens (no gradients)."""
    total, count = 0.0, 0
    for i in range(args.eval_batches):
        windows = batch_at(tokens, 10_000 + args.seed, i, args.batch, args.seq_len)
        target = windows[:, 1:]  # (B, L - 1): position t predicts token t + 1, as in training
        logits = model.forward(windows, use_cache=False, backend=backend).logits[:, :-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]  # (B, L)
        picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
        total += float((logz - picked).sum())
        count += target.size
    return total / count


def sample(model, codec: Codec, prompt: np.ndarray, n_new: int, rng, backend, temperature: float = 0.8) -> str:
    """``n_new`` tokens after ``prompt``, sampled from softmax(logits / temperature), through the KV cache."""
    cfg = model.config
    prompt = prompt[-(cfg.max_positions - n_new) :] if len(prompt) + n_new > cfg.max_positions else prompt
    cache = model.new_cache(1, len(prompt) + n_new)
    logits = model.forward(prompt[None], past=cache, backend=backend).logits[0, -1]
    out = []
    for _ in range(n_new):
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        token = int(rng.choice(len(p), p=p / p.sum()))
        out.append(token)
        if len(out) == n_new:
            break
        logits = model.forward(np.array([[token]]), past=cache, backend=backend).logits[0, -1]
    return codec.decode(out)


def plot(path: str, train: list, evals: list) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train], [x for _, x in train], label="train", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [x for _, x in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("python -m fastattn train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Saving and resuming
# ----------------------------------------------------------------------------------------------------------------
RUN_OPTIONS = ("data", "tokens", "layers", "width", "heads", "seq_len", "batch", "steps", "lr", "warmup",
               "weight_decay", "clip", "seed", "eval_every", "eval_batches")  # fmt: skip


def save_run(out: str, model, opt, state: dict) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    sd = opt.state_dict()
    arrays = {f"exp_avg/{n}": a for n, a in sd["exp_avg"].items()}
    arrays.update({f"exp_avg_sq/{n}": a for n, a in sd["exp_avg_sq"].items()})
    tmp = os.path.join(out, OPTIMIZER_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out, OPTIMIZER_FILE))
    state = dict(state, optimizer={k: sd[k] for k in ("lr", "betas", "eps", "weight_decay", "step")})
    with open(os.path.join(out, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(out, LOSSES_FILE), "w", encoding="utf-8") as f:
        f.write("step,train_loss,eval_loss\n")
        evals = dict((s, x) for s, x in state["eval_losses"])
        for s, x in state["train_losses"]:
            f.write(f"{s},{x!r},{evals.get(s, '')!r}\n".replace("''", ""))


def load_run(directory: str, backend):
    import fastattn.models
    from fastattn.optim import AdamW

    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {directory!r}: no {STATE_FILE} there (not a directory written by train)")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    model = fastattn.models.load(directory, backend=backend)
    params = model.parameters()
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as z:
        sd = dict(state["optimizer"])
        sd["betas"] = tuple(sd["betas"])
        sd["exp_avg"] = {n: z[f"exp_avg/{n}"] for n in params}
        sd["exp_avg_sq"] = {n: z[f"exp_avg_sq/{n}"] for n in params}
    opt = AdamW(params)
    opt.load_state_dict(sd)
    return model, opt, state


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def _check(args) -> None:
    for name in ("layers", "width", "heads", "seq_len", "batch", "steps", "eval_batches"):
        value = getattr(args, name)
        if value is None or value < 1:
            raise SystemExit(f"train: --{name.replace('_', '-')} must be >= 1, got {value}")
    if args.width % args.heads:
        raise SystemExit(f"train: --width {args.width} does not split into --heads {args.heads} heads")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit(f"train: --lr must be a positive number, got {args.lr}")


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run(args) -> int:
    import fastattn
    import fastattn.models
    from fastattn.models import GPT2Model
    from fastattn.optim import AdamW, clip_grad_norm, warmup_cosine

    say = (lambda *a, **k: None) if args.quiet else print
    if args.threads is not None:
        fastattn.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    backend = args.backend
    if args.resume:
        model, opt, state = load_run(args.resume, backend)
        for name in RUN_OPTIONS:  # the run's own options; --steps may extend it
            if name != "steps":
                setattr(args, name, state["args"][name])
        if args.steps < state["step"]:
            raise SystemExit(f"train: --steps {args.steps} is below the {state['step']} steps already done")
        codec = Codec.from_json(state["codec"])
        tokens, _, source = load_data(args.data, args.tokens, codec)
        out = args.resume if args.out == "fastattn-train" else args.out
    else:
        _check(args)
        tokens, codec, source = load_data(args.data, args.tokens)
        config = {"vocab_size": codec.vocab_size, "n_positions": args.seq_len, "n_embd": args.width,
                  "n_layer": args.layers, "n_head": args.heads}  # fmt: skip
        model = GPT2Model.init(config, seed=args.seed, backend=backend)
        opt = AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        state = {"step": 0, "train_losses": [], "eval_losses": [], "codec": codec.to_json(), "seconds": 0.0}
        out = args.out
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 5)
    state["args"] = {name: getattr(args, name) for name in RUN_OPTIONS}
    train_tokens, eval_tokens = split_tokens(tokens)
    if len(eval_tokens) < args.seq_len + 2 or len(train_tokens) < args.seq_len + 2:
        raise SystemExit(f"train: the text ({len(tokens)} tokens) is too short for --seq-len {args.seq_len}")
    cfg = model.config
    n_params = sum(p.size for p in model.parameters().values())
    say(f"data: {source}: {len(tokens):,} tokens ({args.tokens}-level, vocabulary {codec.vocab_size}); "
        f"90% train, 10% held out")  # fmt: skip
    chosen = fastattn.available_backends()[0] if backend is None else backend
    say(f"model: GPT-2, {cfg.num_layers} layers x {cfg.hidden_size} wide, {cfg.num_heads} heads, context "
        f"{cfg.max_positions}: {n_params:,} parameters; backend {chosen}, "
        f"{fastattn.get_num_threads()} threads")  # fmt: skip
    say(f"uniform baseline: ln({codec.vocab_size}) = {math.log(codec.vocab_size):.3f} nats/token")
    start_step = state["step"]
    last = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    tokens_per_step = args.batch * args.seq_len
    t0 = time.perf_counter()
    for step in range(start_step, last):
        windows = batch_at(train_tokens, args.seed, step, args.batch, args.seq_len)
        loss, grads = model.loss_and_grads(windows, backend=backend)  # position t predicts token t + 1
        clip_grad_norm(grads, args.clip)
        opt.lr = warmup_cosine(step, max_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                               min_lr=args.lr / 10)  # fmt: skip
        opt.step(grads)
        state["train_losses"].append((step + 1, loss))
        state["step"] = step + 1
        done = step + 1 - start_step
        elapsed = time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = eval_loss(model, eval_tokens, args, backend)
            state["eval_losses"].append((step + 1, ev))
            say(f"step {step + 1:5d}/{args.steps}  held-out loss {ev:.4f}")
        if done == 1 or (step + 1) % max(1, args.steps // 25) == 0 or step + 1 == last:
            rate = done * tokens_per_step / elapsed
            left = (last - step - 1) * elapsed / done
            say(f"step {step + 1:5d}/{args.steps}  loss {loss:.4f}  lr {opt.lr:.2e}  {rate:,.0f} tokens/s  "
                f"elapsed {_fmt_time(elapsed)}  left {_fmt_time(left)}")  # fmt: skip
    state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
    save_run(out, model, opt, state)
    png = plot(os.path.join(out, "loss.png"), state["train_losses"], state["eval_losses"])
    evals = state["eval_losses"]
    final = f"held-out loss {evals[-1][1]:.3f}" if evals else "no evaluation yet"
    print(f"trained {state['step']}/{args.steps} steps in {_fmt_time(state['seconds'])}: {final} "
          f"(uniform ln({codec.vocab_size}) = {math.log(codec.vocab_size):.3f}); saved to {out}"
          + (" (loss.png)" if png else ""))  # fmt: skip
    if args.samples and state["step"] == args.steps:
        rng = np.random.default_rng(args.seed)
        for i in range(args.samples):
            begin = int(rng.integers(0, len(eval_tokens) - 16))
            prompt = eval_tokens[begin : begin + 16]
            text = sample(model, codec, prompt, min(120, cfg.max_positions - 16), rng, backend)
            say(f"--- sample {i + 1}: {codec.decode(prompt)!r} ->")
            say(text.split("\n\n")[0][:300])
    return 0
