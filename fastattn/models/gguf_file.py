"""GGUF files (llama.cpp's single-file format) as ``LlamaModel``: read with the ``gguf`` package, dequantized at load.

The file's metadata becomes a Hugging Face-style config (``llama.context_length`` -> ``max_position_embeddings``,
``llama.attention.head_count_kv`` -> ``num_key_value_heads``, ``llama.rope.freq_base`` -> ``rope_theta``, ...) that
``LlamaConfig.from_dict`` checks as for a directory; the tensors are found under their llama.cpp names
(``token_embd``, ``blk.N.attn_q``, ...) through the same tensor map as a Hugging Face checkpoint (``GGUFStore``
translates the names). Tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K are dequantized with
``gguf.quants.dequantize`` into float32, then cast to the model dtype.

llama.cpp's converter permutes the rows of the q and k projections of ``llama`` models (its rotary layout pairs
neighbouring features, Hugging Face's pairs the two halves); as transformers' own GGUF loader, this module undoes
the permutation for the ``llama`` architecture. The tokenizer is built with the ``tokenizers`` package from the
vocabulary and merges in the metadata (``tokenizer.ggml.model == "gpt2"``: byte-level BPE); other tokenizer models
load without a tokenizer (the model then takes token ids).
"""

from __future__ import annotations

import os
import re

import numpy as np

from .. import _backends
from .. import _validation as V
from ._checkpoint import INSTALL_HINT, CheckpointError

__all__ = ["load", "GGUFStore", "read_config", "ARCHITECTURES", "TENSOR_TYPES"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

#: Hugging Face tensor names (under "model.", or the root lm_head) -> llama.cpp names; {i} is the layer.
GLOBAL_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def import_gguf():
    """The ``gguf`` package, or an ImportError that says how to install it."""
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"reading GGUF files needs the gguf package, which is not installed: {INSTALL_HINT}") from exc
    return gguf


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor name (None: the map has no such tensor)."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    m = _LAYER.fullmatch(hf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


class GGUFStore:
    """The tensors of a GGUF file behind ``TensorStore``'s interface (``get``, ``has``, ``prefix``), by their
    Hugging Face names; dequantized one at a time when read."""

    def __init__(self, path: str, reader, architecture: str, num_heads: int, num_kv_heads: int):
        self.path = path
        self.reader = reader
        self.architecture = architecture
        self.heads = (num_heads, num_kv_heads)
        self.prefix = "model."
        self._tensors = {t.name: t for t in reader.tensors}

    def names(self) -> set[str]:
        return set(self._tensors)

    def _lookup(self, name: str) -> str | None:
        full = self.prefix + name
        return gguf_name(full[len("model.") :] if full.startswith("model.") else full)

    def has(self, name: str) -> bool:
        key = self._lookup(name)
        return key is not None and key in self._tensors

    def get(self, name: str, shape: tuple[int, ...], dtype, *, what: str = "") -> np.ndarray:
        gguf = import_gguf()
        key = self._lookup(name)
        where = f"the GGUF file {self.path!r}"
        if key is None or key not in self._tensors:
            raise CheckpointError(
                f"{where} is missing the tensor {key or name!r} (Hugging Face name {self.prefix + name!r})"
                + (f" ({what})" if what else "")
            )
        tensor = self._tensors[key]
        kind = tensor.tensor_type.name
        if kind not in TENSOR_TYPES:
            raise CheckpointError(
                f"{where}: the tensor {key!r} has type {kind}, which fastattn does not read; supported: {TENSOR_TYPES}"
            )
        numpy_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
        if numpy_shape != tuple(shape):
            raise CheckpointError(
                f"{where}: the tensor {key!r} has shape {numpy_shape} but the metadata implies {tuple(shape)}"
                + (f" ({what})" if what else "")
            )
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(numpy_shape)
        if self.architecture == "llama" and (".attn_q." in key or ".attn_k." in key):
            heads = self.heads[0] if ".attn_q." in key else self.heads[1]
            array = unpermute(array, heads)
        return np.ascontiguousarray(array, dtype=dtype)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (pairs of neighbours) back to (two halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_config(reader, path: str) -> tuple[dict, str]:
    """(a Hugging Face-style config dict, the GGUF architecture) from the file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"the GGUF file {path!r} holds architecture {arch!r}; fastattn reads GGUF architectures {ARCHITECTURES}"
        )

    def meta(key, default=None, required=True):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise CheckpointError(f"the GGUF file {path!r} lacks the metadata {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = meta("vocab_size", None, required=False)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens) if tokens else (int(embd.shape[1]) if embd is not None else None)
    name = str(_field(reader, "general.name", "") or "")
    model_type = arch
    window = meta("attention.sliding_window", None, required=False)
    if arch == "llama" and ("mistral" in name.lower() or window):
        model_type = "mistral"
    config = {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in names,
    }
    head_dim = meta("attention.key_length", None, required=False)
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    if window:
        config["sliding_window"] = int(window)
        config["use_sliding_window"] = True
        config["max_window_layers"] = 0
    scaling = meta("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        factor = meta("rope.scaling.factor", None, required=False)
        rope = {"rope_type": str(scaling), "factor": None if factor is None else float(factor)}
        original = meta("rope.scaling.original_context_length", None, required=False)
        if original is not None:
            rope["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = rope
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config["pad_token_id" if key == "padding_token_id" else key] = int(value)
    return config, arch


def tokenizer_from(reader, pad_id):
    """A ``Tokenizer`` from the metadata's vocabulary and merges (byte-level BPE), or None when the file has no
    such tokenizer or the tokenizers package is not installed."""
    from .tokenizer import Tokenizer

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        return None
    try:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Inner
    except ImportError:
        return None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    inner = Inner(models.BPE(vocab, pairs))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, t in enumerate(types) if int(t) in (3, 4)]  # CONTROL, USER_DEFINED
    if special:
        inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token") and bos is not None:
        token = tokens[int(bos)]
        inner.post_processor = processors.TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, int(bos))]
        )
    return Tokenizer(inner, 0 if pad_id is None else pad_id)


def load(path, *, backend=None, dtype=np.float32):
    """A ``LlamaModel`` from the GGUF file ``path``."""
    from .llama import LlamaConfig, LlamaModel

    path = os.fspath(path)
    dtype = V.float_dtype("dtype", dtype)
    if backend is not None:
        backend = _backends.resolve_name(backend)
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # not a GGUF file, truncated, a version the package cannot read
        raise CheckpointError(f"{path!r} is not a readable GGUF file: {exc}") from exc
    raw, arch = read_config(reader, path)
    cfg = LlamaConfig.from_dict(raw)
    store = GGUFStore(path, reader, arch, cfg.num_heads, cfg.num_kv_heads)
    weights = LlamaModel._weights(store, cfg, dtype)
    tokenizer = tokenizer_from(reader, cfg.pad_token_id)
    return LlamaModel(cfg, weights, backend=backend, dtype=dtype, tokenizer=tokenizer, path=path)
