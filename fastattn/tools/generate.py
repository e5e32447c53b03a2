"""``python -m fastattn generate --model PATH "prompt"``: text from a local decoder, printed as it comes.

PATH is a Hugging Face directory (GPT-2 or Llama family: ``config.json``, ``model.safetensors``, ``tokenizer.json``)
or a GGUF file. Greedy by default; ``--temperature``, ``--top-k``, ``--top-p`` or ``--seed`` sample instead
(Hugging Face's meaning of each; ``--temperature 0`` is greedy). At the end, prefill and decode tokens/s go to
standard error.
"""

from __future__ import annotations

import sys

HELP = "generate text from a local decoder (GPT-2 or Llama family; a model directory or a GGUF file)"


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help="the text to continue (with --ids: token ids separated by spaces or commas)")
    parser.add_argument("--model", required=True, metavar="PATH", help="model directory or .gguf file")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--temperature", type=float, default=None, metavar="T", help="sample at T (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="sample from the top-P mass")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="sample with this seed (repeatable)")
    parser.add_argument("--backend", default=None, help="numba, cython or numpy (default: automatic)")
    parser.add_argument("--ids", action="store_true", help="the prompt is token ids; print ids, not text")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids expects integers separated by spaces or commas, got {text!r}") from None


class _Printer:
    """Prints the text of the new tokens as they come (decoding the whole continuation each time, so that a
    character split over several byte tokens appears once it is whole)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token) -> None:
        self.ids.append(int(token))
        if self.tokenizer is None:
            self.out.write(f"{int(token)} ")
        else:
            text = self.tokenizer.decode(self.ids)
            if text.startswith(self.shown) and not text.endswith("\ufffd"):
                self.out.write(text[len(self.shown) :])
                self.shown = text
        self.out.flush()


def run(args) -> int:
    import numpy as np

    from ..models import CheckpointError, load
    from ..models.base import Decoder

    try:
        model = load(args.model, backend=args.backend)
        if not isinstance(model, Decoder):
            raise ValueError(f"{args.model} holds a {type(model).__name__}; generate needs a decoder")
        if args.ids:
            prompt = np.array(_parse_ids(args.prompt), np.int64)
            tokenizer = None
        else:
            tokenizer = model._require_tokenizer()
            prompt = np.array(tokenizer.encode(args.prompt), np.int64)
        sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.seed))
        if args.temperature == 0:
            sample = False
        knobs = dict(do_sample=sample, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        if args.temperature not in (None, 0):
            knobs["temperature"] = args.temperature
        if not args.ids:
            sys.stdout.write(args.prompt)
        printer = _Printer(tokenizer, sys.stdout)
        out = model.generate(prompt, args.max_new_tokens, streamer=printer, **knobs)
    except (OSError, ImportError, ValueError, IndexError, TypeError, CheckpointError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    if tokenizer is not None and printer.shown != tokenizer.decode(printer.ids):  # a last partial character
        sys.stdout.write(tokenizer.decode(printer.ids)[len(printer.shown) :])
    sys.stdout.write("\n")
    sys.stdout.flush()
    steps = out.new_tokens - 1
    print(
        f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds:.3f} s "
        f"({out.prefill_tokens_per_second:.1f} tokens/s); decode: {max(steps, 0)} tokens in "
        f"{out.decode_seconds:.3f} s ({out.decode_tokens_per_second:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0
