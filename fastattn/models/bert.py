"""BERT-family encoders (BERT, and RoBERTa's position numbering) on fastattn's kernels.

One block, post-LayerNorm, as Hugging Face's ``BertLayer`` computes it, with the kernel that runs each line::

    qkv = x @ W_qkv                                    text_matmul (Q, K and V weights concatenated at load)
    q, k, v = heads(qkv + b_qkv)                       split_qkv
    o = softmax(q kᵀ / √d + padding) v                 the fused attention kernel, padding as a key bias
    h = LayerNorm(merge(o) @ W_o + b_o + x)            text_matmul, merge_heads, bias_residual_layer_norm
    x' = LayerNorm(GELU(h @ W_in + b_in) @ W_out + b_out + h)     text_matmul, bias_gelu, text_matmul, bias_res...

The matmuls run on the backend's own register-blocked micro-kernel (``text_matmul``), not BLAS: it gives a row the
same bits wherever the row sits, so a text's embedding is the same in any batch (``encode``), and it skips the
padding. The embeddings are one gather kernel (word + position + token type rows) and a LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import _call
from .. import _validation as V
from . import _ops
from ._checkpoint import CheckpointError, config_value, read_json
from .base import Model, Weight, read_weights

__all__ = ["BertConfig", "BertModel", "EncoderOutput"]

#: model_type values run by BertModel, and the tensor prefixes their task checkpoints use.
MODEL_TYPES = {
    "bert": ("", "bert."),
    "roberta": ("", "roberta."),
    "xlm-roberta": ("", "roberta."),
    "camembert": ("", "roberta."),
}
#: model types that number positions from padding_idx + 1, skipping padding (RoBERTa's create_position_ids).
_PADDING_POSITIONS = {"roberta", "xlm-roberta", "camembert"}
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` that the encoder uses (Hugging Face names in the comments)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    intermediate_size: int
    max_positions: int  # max_position_embeddings
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @classmethod
    def from_dict(cls, config: dict) -> BertConfig:
        model_type = config.get("model_type", "bert")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"config.json: position_embedding_type={config['position_embedding_type']!r} is not supported "
                "(only 'absolute' learned positions)"
            )
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise CheckpointError("config.json: is_decoder / add_cross_attention models are not supported")
        out = cls(
            model_type=model_type,
            vocab_size=config_value(config, "vocab_size", int),
            hidden_size=config_value(config, "hidden_size", int),
            num_layers=config_value(config, "num_hidden_layers", int),
            num_heads=config_value(config, "num_attention_heads", int),
            intermediate_size=config_value(config, "intermediate_size", int),
            max_positions=config_value(config, "max_position_embeddings", int),
            type_vocab_size=config_value(config, "type_vocab_size", int, default=2),
            layer_norm_eps=config_value(config, "layer_norm_eps", float, default=1e-12),
            hidden_act=config_value(config, "hidden_act", str, default="gelu"),
            pad_token_id=config_value(config, "pad_token_id", int, default=0),
        )
        _ops.check_heads(out.hidden_size, out.num_heads, "hidden_size", "num_attention_heads")
        _ops.activation_kernel(out.hidden_act, "hidden_act")
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


#: checkpoint tensor -> model weight (names under the prefix: "" or "bert." / "roberta." in task checkpoints).
TENSORS = (
    Weight("word", "embeddings.word_embeddings.weight", ("vocab_size", "hidden_size"), "(vocab_size, hidden_size)"),
    Weight("positions", "embeddings.position_embeddings.weight", ("max_positions", "hidden_size"),
           "(max_position_embeddings, hidden_size)"),
    Weight("types", "embeddings.token_type_embeddings.weight", ("type_vocab_size", "hidden_size"),
           "(type_vocab_size, hidden_size)"),
    Weight("ln_g", "embeddings.LayerNorm.weight", ("hidden_size",)),
    Weight("ln_b", "embeddings.LayerNorm.bias", ("hidden_size",)),
)  # fmt: skip
_P = "encoder.layer.{i}."
LAYER_TENSORS = (
    Weight("wq", _P + "attention.self.query.weight", ("hidden_size", "hidden_size")),
    Weight("bq", _P + "attention.self.query.bias", ("hidden_size",)),
    Weight("wk", _P + "attention.self.key.weight", ("hidden_size", "hidden_size")),
    Weight("bk", _P + "attention.self.key.bias", ("hidden_size",)),
    Weight("wv", _P + "attention.self.value.weight", ("hidden_size", "hidden_size")),
    Weight("bv", _P + "attention.self.value.bias", ("hidden_size",)),
    Weight("wo", _P + "attention.output.dense.weight", ("hidden_size", "hidden_size")),
    Weight("bo", _P + "attention.output.dense.bias", ("hidden_size",)),
    Weight("ln1_g", _P + "attention.output.LayerNorm.weight", ("hidden_size",)),
    Weight("ln1_b", _P + "attention.output.LayerNorm.bias", ("hidden_size",)),
    Weight("wi", _P + "intermediate.dense.weight", ("intermediate_size", "hidden_size")),
    Weight("bi", _P + "intermediate.dense.bias", ("intermediate_size",)),
    Weight("wf", _P + "output.dense.weight", ("hidden_size", "intermediate_size")),
    Weight("bf", _P + "output.dense.bias", ("hidden_size",)),
    Weight("ln2_g", _P + "output.LayerNorm.weight", ("hidden_size",)),
    Weight("ln2_b", _P + "output.LayerNorm.bias", ("hidden_size",)),
)


@dataclass
class _Layer:
    w_qkv: np.ndarray  # (D, 3D)  Q, K, V projections side by side, applied as x @ w
    b_qkv: np.ndarray  # (3D,)
    w_o: np.ndarray  # (D, D)
    b_o: np.ndarray
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w_in: np.ndarray  # (D, F)
    b_in: np.ndarray
    w_out: np.ndarray  # (F, D)
    b_out: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray


@dataclass
class EncoderOutput:
    """What ``BertModel.forward`` returns (Hugging Face's names).

    Attributes
    ----------
    last_hidden_state : ndarray, shape (B, N, D)
    hidden_states : tuple of ndarray, or None
        With ``output_hidden_states=True``: the embeddings' output, then every layer's, each (B, N, D).
    pooler_output : ndarray, shape (B, D), or None
        tanh(dense(first token)) when the checkpoint has the pooler's weights.
    """

    last_hidden_state: np.ndarray
    hidden_states: tuple[np.ndarray, ...] | None = None
    pooler_output: np.ndarray | None = None


@dataclass
class _Pooling:
    mode: str = "mean"
    normalize: bool = True
    max_length: int | None = None
    source: str = "default"


class BertModel(Model):
    """A BERT-family encoder running on fastattn's kernels. Build it with ``fastattn.models.load``.

    Parameters
    ----------
    config : BertConfig
    weights : dict
        Built by ``from_pretrained``.
    backend : str, optional
        ``"numba"``, ``"cython"`` or ``"numpy"``; None follows ``fastattn.use_backend`` / ``FASTATTN_BACKEND``
        at each call.
    dtype : float32 or float64
    tokenizer : Tokenizer, optional
        From the directory's ``tokenizer.json``; needed to encode text.

    Examples
    --------
    >>> import numpy as np, fastattn.models
    >>> model = fastattn.models.load("path/to/bert")                      # doctest: +SKIP
    >>> out = model(np.array([[101, 7592, 102]]))                          # doctest: +SKIP
    >>> out.last_hidden_state.shape                                        # doctest: +SKIP
    (1, 3, 384)
    >>> model.encode(["a sentence", "another one"]).shape                  # doctest: +SKIP
    (2, 384)
    """

    config_class = BertConfig

    def __init__(
        self,
        config: BertConfig,
        weights: dict,
        *,
        backend=None,
        dtype=np.float32,
        tokenizer=None,
        pooling: _Pooling | None = None,
        path: str | None = None,
    ):
        super().__init__(config, weights, backend=backend, dtype=dtype, tokenizer=tokenizer, path=path)
        self.pooling = pooling or _Pooling()

    # ----------------------------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, backend=None, dtype=np.float32, config: dict | None = None) -> BertModel:
        """Load ``path`` (``config.json`` + ``model.safetensors``, optionally ``tokenizer.json`` and the
        sentence-transformers files ``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``)."""
        model = super().from_pretrained(path, backend=backend, dtype=dtype, config=config)
        model.pooling = _read_pooling(model.path, model.config)
        return model

    @classmethod
    def _prefixes(cls, cfg: BertConfig):
        return "embeddings.word_embeddings.weight", MODEL_TYPES.get(cfg.model_type, ("", "bert."))

    @classmethod
    def _weights(cls, store, cfg: BertConfig, dtype) -> dict:
        w = read_weights(
            store, TENSORS, cfg, dtype, layers=cfg.num_layers, layer_map=LAYER_TENSORS,
            layer_what=lambda i: f"layer {i} of num_hidden_layers={cfg.num_layers}",
        )  # fmt: skip
        layers = []
        for raw in w["layers"]:  # Hugging Face Linear weights are (out, in): applied as x @ weight.T
            layers.append(
                _Layer(
                    w_qkv=np.ascontiguousarray(np.concatenate([raw["wq"].T, raw["wk"].T, raw["wv"].T], axis=1)),
                    b_qkv=np.concatenate([raw["bq"], raw["bk"], raw["bv"]]),
                    w_o=np.ascontiguousarray(raw["wo"].T),
                    b_o=raw["bo"],
                    ln1_g=raw["ln1_g"],
                    ln1_b=raw["ln1_b"],
                    w_in=np.ascontiguousarray(raw["wi"].T),
                    b_in=raw["bi"],
                    w_out=np.ascontiguousarray(raw["wf"].T),
                    b_out=raw["bf"],
                    ln2_g=raw["ln2_g"],
                    ln2_b=raw["ln2_b"],
                )
            )
        w["layers"] = layers
        if store.has("pooler.dense.weight"):
            w["pooler_w"] = np.ascontiguousarray(store.get("pooler.dense.weight", (cfg.hidden_size,) * 2, dtype).T)
            w["pooler_b"] = store.get("pooler.dense.bias", (cfg.hidden_size,), dtype)
        return w

    # ----------------------------------------------------------------------------------------------------------
    # The forward pass
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        position_ids=None,
        output_hidden_states: bool = False,
        backend=None,
    ) -> EncoderOutput:
        """Run the encoder.

        Parameters
        ----------
        input_ids : array_like of int, shape (B, N) or (N,)
        attention_mask : array_like, shape (B, N), optional
            Hugging Face's convention: 1 for a token, 0 for padding (padding is never attended to).
        token_type_ids : array_like of int, shape (B, N), optional
            Segment ids; zeros by default.
        position_ids : array_like of int, shape (B, N), optional
            Default: 0 .. N-1 (BERT), or RoBERTa's numbering from ``pad_token_id + 1`` skipping padding.
        output_hidden_states : bool
            Also return the embeddings' output and every layer's.
        backend : str, optional
            Overrides the model's backend for this call.

        Returns
        -------
        EncoderOutput
            ``last_hidden_state`` (B, N, D) (or (N, D) for 1-D input), ``hidden_states``, ``pooler_output``.
        """
        cfg = self.config
        ids, squeeze = _ops.token_ids("input_ids", input_ids, cfg.vocab_size)
        B, N = ids.shape
        keep = _ops.keep_mask("attention_mask", attention_mask, (B, N))
        types, positions = self._types_and_positions(ids, token_type_ids, position_ids)
        hidden = self._encode(ids, keep, types, positions, output_hidden_states, backend)
        last = hidden[-1]
        pooler = None
        if "pooler_w" in self._w:
            pooler = np.tanh(last[:, 0] @ self._w["pooler_w"] + self._w["pooler_b"])
        if squeeze:
            hidden = [h[0] for h in hidden]
            last = hidden[-1]
            pooler = None if pooler is None else pooler[0]
        return EncoderOutput(
            last_hidden_state=last,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            pooler_output=pooler,
        )

    __call__ = forward

    def _types_and_positions(self, ids, token_type_ids, position_ids) -> tuple[np.ndarray, np.ndarray]:
        """Checked token type ids and position ids (B, N), the defaults where None."""
        cfg = self.config
        B, N = ids.shape
        types = (
            np.zeros((B, N), np.int64)
            if token_type_ids is None
            else _ops.token_ids("token_type_ids", token_type_ids, cfg.type_vocab_size)[0]
        )
        if types.shape != (B, N):
            raise ValueError(f"token_type_ids must have the shape of input_ids {(B, N)}, got {types.shape}")
        if position_ids is None:
            positions = self._position_ids(ids)
        else:
            positions = _ops.token_ids("position_ids", position_ids, cfg.max_positions)[0]
            positions = np.ascontiguousarray(np.broadcast_to(positions, (B, N)))
        if positions.size and positions.max() >= cfg.max_positions:
            raise ValueError(
                f"sequences of {N} tokens need position {int(positions.max())}, but the model has "
                f"max_position_embeddings={cfg.max_positions}: truncate the input"
            )
        return types, positions

    def _position_ids(self, ids: np.ndarray) -> np.ndarray:
        cfg = self.config
        B, N = ids.shape
        if cfg.model_type in _PADDING_POSITIONS:  # RoBERTa: padding_idx + 1, + 2, ... over real tokens only
            real = (ids != cfg.pad_token_id).astype(np.int64)
            return np.ascontiguousarray(np.cumsum(real, axis=1) * real + cfg.pad_token_id)
        return np.ascontiguousarray(np.broadcast_to(np.arange(N, dtype=np.int64), (B, N)))

    def _encode(self, ids, keep, types, positions, keep_all: bool, backend, lengths=None) -> list[np.ndarray]:
        kern, blk = _ops.kernels(self.backend if backend is None else backend)
        with _ops.threads_for(ids.size * max(self.config.hidden_size, self.config.intermediate_size), kern, blk):
            return self._layers(kern, blk, ids, keep, types, positions, keep_all, lengths)

    def _layers(self, kern, blk, ids, keep, types, positions, keep_all: bool, lengths=None) -> list[np.ndarray]:
        """The encoder's layers. The matmuls run on the backend's ``text_matmul`` (its own micro-kernel), which gives
        a row the same bits wherever it sits; with ``lengths`` (B,) (sentence embeddings: every mask a prefix of
        real tokens) only each sequence's real rows are multiplied, and the padded rows' states are left
        meaningless (zeros, the pad tokens' embeddings): the bits of a sequence's real rows then depend on the
        sequence alone, not on its batch, the padded length or the thread count."""
        cfg, w = self.config, self._w
        dt = self.dtype
        B, N = ids.shape
        T, D, H, d, F = B * N, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        eps = cfg.layer_norm_eps
        new = np.empty if lengths is None else np.zeros  # rows past lengths are never written: keep them finite
        rows = np.full(B, N, np.int64) if lengths is None else lengths

        def matmul(out, a, weight):  # the backend's micro-kernel: a row's bits are its own (see text_matmul)
            blk.text_matmul(out.reshape(B, N, -1), a.reshape(B, N, -1), weight, rows)

        x = np.empty((T, D), dt)  # the residual stream, token by token
        if T:
            blk.embedding(
                x,
                ids.reshape(-1),
                w["word"],
                positions.reshape(-1),
                w["positions"],
                types.reshape(-1),
                w["types"],
                True,
            )
            blk.layer_norm(x, x, w["ln_g"], w["ln_b"], eps)
        states = [x]
        bias = _ops.key_bias(keep, dt)  # (B, N): 0 or -inf per key, None without padding
        scale = 1.0 / math.sqrt(d)
        # work buffers, reused by every layer
        qkv = new((T, 3 * D), dt)
        q, k, v, o = (np.empty((B, H, N, d), dt) for _ in range(4))
        ctx = np.empty((T, D), dt)
        proj = new((T, D), dt)
        h = np.empty((T, D), dt)
        f = new((T, F), dt)
        act = getattr(blk, _ops.activation_kernel(cfg.hidden_act, "hidden_act"))
        for layer in w["layers"] if T else ():
            matmul(qkv, x, layer.w_qkv)  # (T, 3D)
            blk.split_qkv(q, k, v, qkv.reshape(B, N, 3 * D), layer.b_qkv, 0)  # (B, H, N, d) each
            _call.attention_into(kern, o, q, k, v, scale, False, 0, None, bias)  # (B, H, N, d)
            blk.merge_heads(ctx.reshape(B, N, D), o)  # (T, D)
            matmul(proj, ctx, layer.w_o)
            blk.bias_residual_layer_norm(h, proj, layer.b_o, x, layer.ln1_g, layer.ln1_b, eps)
            matmul(f, h, layer.w_in)  # (T, F)
            act(f, f, layer.b_in)
            matmul(proj, f, layer.w_out)  # (T, D)
            x = np.empty((T, D), dt) if keep_all else x  # the old stream is dead unless it is kept
            blk.bias_residual_layer_norm(x, proj, layer.b_out, h, layer.ln2_g, layer.ln2_b, eps)
            if keep_all:
                states.append(x)
        if not keep_all:
            states = [x]
        return [s.reshape(B, N, D) for s in states]

    # ----------------------------------------------------------------------------------------------------------
    # Sentence embeddings
    # ----------------------------------------------------------------------------------------------------------
    def encode(
        self,
        inputs,
        attention_mask=None,
        token_type_ids=None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        batch_size: int = 32,
        backend=None,
    ) -> np.ndarray:
        """Sentence embeddings: pooled token states (mean over real tokens by default), L2-normalised.

        The pooling and normalisation follow a sentence-transformers directory (``modules.json``,
        ``1_Pooling/config.json``) when present; otherwise mean pooling and L2 normalisation.

        Parameters
        ----------
        inputs : str, sequence of str, or array_like of int (B, N)
            Text (needs ``tokenizer.json`` and the tokenizers package) or token ids.
        attention_mask, token_type_ids : array_like, optional
            With token ids only: 1 = token, 0 = padding.
        pooling : {"mean", "cls", "max", "mean_sqrt_len"}, optional
        normalize : bool, optional
        batch_size : int
            Texts are sorted by length and run ``batch_size`` at a time.

        Returns
        -------
        ndarray, shape (B, D), or (D,) for a single string.

        Examples
        --------
        >>> emb = model.encode(["The dog chased the cat.", "A cat was chased."])   # doctest: +SKIP
        >>> float(emb[0] @ emb[1])        # cosine similarity                     # doctest: +SKIP
        """
        mode = self.pooling.mode if pooling is None else pooling
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
        normalize = self.pooling.normalize if normalize is None else bool(normalize)
        batch_size = V.positive_int("batch_size", batch_size)
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            return np.empty((0, self.config.hidden_size), self.dtype)
        if isinstance(inputs, str) or (
            isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)
        ):
            if attention_mask is not None or token_type_ids is not None:
                raise ValueError("attention_mask and token_type_ids go with token ids, not with text")
            return self._encode_texts(inputs, mode, normalize, batch_size, backend)
        ids, squeeze = _ops.token_ids("inputs", inputs, self.config.vocab_size)
        keep = _ops.keep_mask("attention_mask", attention_mask, ids.shape)
        keep = np.ones(ids.shape, bool) if keep is None else keep
        pooled = _pool(self._sentence_states(ids, keep, token_type_ids, backend), keep, mode, normalize)
        return pooled[0] if squeeze else pooled

    embed_sentences = encode

    def _encode_texts(self, texts, mode, normalize, batch_size, backend):
        self._require_tokenizer()
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        limit = self.pooling.max_length or self.config.max_positions
        if self.config.model_type in _PADDING_POSITIONS:
            limit = min(limit, self.config.max_positions - self.config.pad_token_id - 1)
        lengths = [len(self.tokenizer.encode(t, max_length=limit)) for t in texts]
        order = np.argsort([-n for n in lengths], kind="stable")  # longest first: little padding per batch
        result = np.empty((len(texts), self.config.hidden_size), self.dtype)
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask, types = self.tokenizer.batch([texts[i] for i in chunk], max_length=limit)
            types = np.minimum(types, self.config.type_vocab_size - 1)
            result[chunk] = _pool(self._sentence_states(ids, mask != 0, types, backend), mask != 0, mode, normalize)
        return result[0] if single else result

    def _sentence_states(self, ids, keep, token_type_ids, backend) -> np.ndarray:
        """The last hidden states (B, N, D) that ``encode`` pools: their real rows (``keep``) are meaningful only.

        When every mask is a prefix (padding on the right, as the tokenizer pads), the matmuls run per sequence on
        its real tokens (``_layers``' ``lengths``): the embedding of a text then has the same bits whatever the
        batch it is in, its padded length and the thread count, so a corpus gives the same rows however it is
        split (``fastattn.models.dask``). Other masks take the forward pass."""
        B, N = ids.shape
        lengths = keep.sum(axis=1, dtype=np.int64)
        if not (keep == (np.arange(N) < lengths[:, None])).all():
            out = self.forward(ids, attention_mask=keep, token_type_ids=token_type_ids, backend=backend)
            return out.last_hidden_state
        types, positions = self._types_and_positions(ids, token_type_ids, None)
        return self._encode(ids, keep, types, positions, False, backend, lengths)[-1]


def _pool(hidden: np.ndarray, keep: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """Pool token states (B, N, D) over real tokens -> (B, D), as sentence-transformers' Pooling, then Normalize."""
    m = keep[..., None].astype(hidden.dtype)  # (B, N, 1)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = np.where(m > 0, hidden, -np.inf).max(axis=1)  # as sentence-transformers: padding never wins
    else:
        counts = np.maximum(m.sum(axis=1), 1e-9)  # (B, 1)
        total = (hidden * m).sum(axis=1)  # (B, D)
        pooled = total / (np.sqrt(counts) if mode == "mean_sqrt_len" else counts)
    if normalize:
        norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / np.maximum(norms, 1e-12)  # torch.nn.functional.normalize's eps
    return np.ascontiguousarray(pooled, dtype=hidden.dtype)


def _read_pooling(path: str, cfg: BertConfig) -> _Pooling:
    """Pooling of a sentence-transformers directory (modules.json and its Pooling module's config.json)."""
    pooling = _Pooling()
    st = read_json(path, "sentence_bert_config.json")
    if isinstance(st, dict) and isinstance(st.get("max_seq_length"), int):
        pooling.max_length = min(st["max_seq_length"], cfg.max_positions)
    modules = read_json(path, "modules.json")
    if not isinstance(modules, list):
        return pooling
    pooling.source = "modules.json"
    kinds = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pooling.normalize = any(k.endswith(".Normalize") for k in kinds)
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            conf = read_json(path, module.get("path", "1_Pooling"), "config.json") or {}
            flags = {
                "cls": conf.get("pooling_mode_cls_token"),
                "max": conf.get("pooling_mode_max_tokens"),
                "mean_sqrt_len": conf.get("pooling_mode_mean_sqrt_len_tokens"),
                "mean": conf.get("pooling_mode_mean_tokens"),
            }
            chosen = [name for name, on in flags.items() if on]
            if len(chosen) > 1:
                raise CheckpointError(
                    f"{module.get('path')}/config.json combines pooling modes {chosen}; fastattn supports one"
                )
            unsupported = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if conf.get(k)]
            if unsupported:
                raise CheckpointError(f"{module.get('path')}/config.json: {unsupported[0]} is not supported")
            if chosen:
                pooling.mode = chosen[0]
    return pooling
