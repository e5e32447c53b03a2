"""``python -m fastattn embed --model DIR "some text"``: sentence embeddings from a local encoder directory.

Prints one embedding per input line: the numbers separated by spaces (``--format json``: a JSON list per line).
Text needs the directory's ``tokenizer.json`` and the tokenizers package; ``--ids`` takes token ids instead.
With no text on the command line, each line of standard input is one text.
"""

from __future__ import annotations

import json
import sys

HELP = "print sentence embeddings of text from a local BERT-family model directory (fastattn.models)"


def add_arguments(parser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: lines of stdin)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="Hugging Face model directory: config.json, model.safetensors, tokenizer.json",
    )
    parser.add_argument("--backend", default=None, help="numba, cython or numpy (default: automatic)")
    parser.add_argument(
        "--ids", action="store_true", help="each TEXT is token ids separated by spaces or commas, not text"
    )
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls", "max", "mean_sqrt_len"),
        default=None,
        help="default: the directory's sentence-transformers pooling, else mean",
    )
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the embeddings")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--decimals", type=int, default=6, help="digits after the point (text format)")
    parser.add_argument("--batch-size", type=int, default=32)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(tok) for tok in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids expects integers separated by spaces or commas, got {text!r}") from None


def run(args) -> int:
    import numpy as np

    from ..models import BertModel, CheckpointError, load

    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        print("error: no text to embed (give TEXT arguments or lines on stdin)", file=sys.stderr)
        return 2
    try:
        model = load(args.model, backend=args.backend)
        if not isinstance(model, BertModel):
            raise ValueError(f"{args.model} holds a {type(model).__name__}; embed needs an encoder (BERT family)")
        normalize = False if args.no_normalize else None
        if args.ids:
            rows = [_parse_ids(t) for t in texts]
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            emb = model.encode(ids, attention_mask=mask, pooling=args.pooling, normalize=normalize)
        else:
            emb = model.encode(texts, pooling=args.pooling, normalize=normalize, batch_size=args.batch_size)
    except (OSError, ImportError, ValueError, IndexError, TypeError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for row in np.atleast_2d(emb):
        if args.format == "json":
            print(json.dumps([round(float(x), args.decimals) for x in row]))
        else:
            print(" ".join(f"{float(x):.{args.decimals}f}" for x in row))
    return 0
