"""Text to ids through the ``tokenizers`` package, from a model directory's ``tokenizer.json`` (an optional extra).

Models load without it: they then take and return token ids only.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ._checkpoint import INSTALL_HINT

TOKENIZER_FILE = "tokenizer.json"


def import_tokenizers():
    """The ``tokenizers`` module, or an ImportError that says how to install it."""
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(
            f"turning text into token ids needs the tokenizers package, which is not installed: {INSTALL_HINT} "
            "(or pass token ids instead of text)"
        ) from exc
    return tokenizers


class Tokenizer:
    """A ``tokenizers.Tokenizer`` read from ``tokenizer.json``, batching to padded NumPy arrays.

    Parameters
    ----------
    inner : tokenizers.Tokenizer
    pad_id : int
        The id written into padding positions (their attention mask is 0, so the value only has to be valid).

    Examples
    --------
    >>> tok = Tokenizer.from_directory("path/to/model")        # doctest: +SKIP
    >>> ids, mask, types = tok.batch(["a short text", "another, longer text"])   # doctest: +SKIP
    """

    def __init__(self, inner, pad_id: int = 0):
        self.inner = inner
        self.pad_id = int(pad_id)
        self._lock = threading.Lock()

    @classmethod
    def from_directory(cls, directory: str, *, pad_id: int | None = None) -> Tokenizer | None:
        """The tokenizer of ``directory/tokenizer.json``; None when the file is absent."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        tokenizers = import_tokenizers()
        inner = tokenizers.Tokenizer.from_file(path)
        inner.no_padding()
        inner.no_truncation()
        padding = None
        try:
            padding = inner.padding
        except Exception:  # pragma: no cover - older tokenizers
            padding = None
        if pad_id is None and padding:
            pad_id = padding.get("pad_id")
        if pad_id is None:
            for token in ("[PAD]", "<pad>", "<|endoftext|>"):
                pad_id = inner.token_to_id(token)
                if pad_id is not None:
                    break
        return cls(inner, 0 if pad_id is None else pad_id)

    @classmethod
    def load_optional(cls, directory: str, *, pad_id: int | None = None) -> Tokenizer | None:
        """``from_directory``, or None when the file is absent or the tokenizers package is not installed (the
        model then works on ids; text raises the ImportError with the install hint when it is asked for)."""
        try:
            return cls.from_directory(directory, pad_id=pad_id)
        except ImportError:
            return None

    def encode(self, text: str, *, max_length: int | None = None) -> list[int]:
        """Token ids of one text (with the special tokens its post-processor adds, e.g. [CLS] ... [SEP])."""
        return list(self._encode_all([text], max_length)[0].ids)

    def decode(self, ids) -> str:
        """Text of a sequence of ids (special tokens skipped)."""
        return self.inner.decode([int(i) for i in np.asarray(ids).ravel()])

    def batch(self, texts, *, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, token_type_ids), each int64 (B, N), padded on the right to the longest."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        encodings = self._encode_all(texts, max_length)
        n = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(texts), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), n), dtype=np.int64)
        types = np.zeros((len(texts), n), dtype=np.int64)
        for row, enc in enumerate(encodings):
            k = len(enc.ids)
            ids[row, :k] = enc.ids
            mask[row, :k] = 1
            types[row, :k] = enc.type_ids
        return ids, mask, types

    def _encode_all(self, texts: list[str], max_length: int | None):
        """Encodings of ``texts``, truncated to ``max_length`` tokens (special tokens kept) when given.

        Truncation is a switch on the shared tokenizer: the lock keeps one thread's setting out of another's call
        (encode_batch itself runs in parallel inside the tokenizers library)."""
        with self._lock:
            if max_length is not None:
                self.inner.enable_truncation(max_length)
            try:
                return self.inner.encode_batch(texts)
            finally:
                if max_length is not None:
                    self.inner.no_truncation()
