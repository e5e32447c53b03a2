"""GPT-2-family decoders on fastattn's kernels: logits, a preallocated KV cache, greedy generation.

One block, pre-LayerNorm, as Hugging Face's ``GPT2Block`` computes it, with the kernel that runs each line::

    a = LayerNorm_1(h)                                         (fused into the previous block's last kernel)
    q, k, v = heads(a @ W_attn + b_attn)                       BLAS (GPT-2's fused c_attn), split_qkv
                                                               (k, v written straight into the cache)
    o = softmax(q kᵀ / √d + causal + padding) v                the fused attention kernel, masks as structure
    h = h + merge(o) @ W_proj + b_proj;  a = LayerNorm_2(h)     BLAS, merge_heads, bias_residual_and_layer_norm
    h = h + GELU_tanh(a @ W_fc + b_fc) @ W_out + b_out          BLAS, bias_gelu_tanh, BLAS,
    a = LayerNorm_1 of the next block (ln_f after the last)    bias_residual_and_layer_norm
    logits = a @ wteᵀ                                          the tied LM head (BLAS)

The cache holds, per layer, keys and values of shape (B, H, capacity, d), allocated once. A step with L new tokens
after ``t`` cached ones writes their keys and values at rows t .. t+L-1 and runs the attention kernel on the whole
buffer with ``causal=True, causal_offset=t``: query i sees keys j <= t + i (bottom-right alignment), and the kernel
never visits the rows beyond, so nothing is copied and nothing is recomputed. Loading, the cache, the work
buffers (allocated once per step shape, reused by every decode step) and generation are the shared base's
(``fastattn.models.base``); this file holds the config, the tensor map and the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import _call
from .. import _validation as V
from . import _ops
from ._checkpoint import CheckpointError, config_value
from .base import Decoder, DecoderOutput, GenerationOutput, KVCache, Weight, read_weights

__all__ = ["GPT2Config", "GPT2Model", "KVCache", "DecoderOutput", "GenerationOutput"]

MODEL_TYPES = ("gpt2",)


@dataclass(frozen=True)
class GPT2Config:
    """The fields of ``config.json`` that the decoder uses (Hugging Face names in the comments)."""

    vocab_size: int
    max_positions: int  # n_positions
    hidden_size: int  # n_embd
    num_layers: int  # n_layer
    num_heads: int  # n_head
    inner_size: int  # n_inner, default 4 * n_embd
    activation: str  # activation_function
    layer_norm_eps: float  # layer_norm_epsilon
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool
    eos_token_id: int | None
    pad_token_id: int | None

    positions_key = "n_positions"  # config.json's name of max_positions, for messages

    @classmethod
    def from_dict(cls, config: dict) -> GPT2Config:
        if config.get("add_cross_attention"):
            raise CheckpointError("config.json: add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
        D = config_value(config, ("n_embd", "hidden_size"), int)
        eos = config.get("eos_token_id")
        out = cls(
            vocab_size=config_value(config, "vocab_size", int),
            max_positions=config_value(config, ("n_positions", "max_position_embeddings"), int),
            hidden_size=D,
            num_layers=config_value(config, ("n_layer", "num_hidden_layers"), int),
            num_heads=config_value(config, ("n_head", "num_attention_heads"), int),
            inner_size=config_value(config, "n_inner", int, default=4 * D),
            activation=config_value(config, "activation_function", str, default="gelu_new"),
            layer_norm_eps=config_value(config, "layer_norm_epsilon", float, default=1e-5),
            scale_attn_weights=bool(config.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else (eos if isinstance(eos, int) else None),
            pad_token_id=config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else None,
        )
        _ops.check_heads(out.hidden_size, out.num_heads, "n_embd", "n_head")
        _ops.activation_kernel(out.activation, "activation_function")
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_size(self) -> int:
        return 3 * self.hidden_size


#: checkpoint tensor -> model weight. GPT-2's Conv1D weights are already (in, out): applied as x @ w.
TENSORS = (
    Weight("wte", "wte.weight", ("vocab_size", "hidden_size"), "(vocab_size, n_embd)"),
    Weight("wpe", "wpe.weight", ("max_positions", "hidden_size"), "(n_positions, n_embd)"),
    Weight("lnf_g", "ln_f.weight", ("hidden_size",)),
    Weight("lnf_b", "ln_f.bias", ("hidden_size",)),
    Weight("lm_head", "lm_head.weight", ("vocab_size", "hidden_size"), "tie_word_embeddings is false",
           unless="tie_word_embeddings", root=True),
)  # fmt: skip
LAYER_TENSORS = (
    Weight("ln1_g", "h.{i}.ln_1.weight", ("hidden_size",)),
    Weight("ln1_b", "h.{i}.ln_1.bias", ("hidden_size",)),
    Weight("w_attn", "h.{i}.attn.c_attn.weight", ("hidden_size", "qkv_size")),
    Weight("b_attn", "h.{i}.attn.c_attn.bias", ("qkv_size",)),
    Weight("w_proj", "h.{i}.attn.c_proj.weight", ("hidden_size", "hidden_size")),
    Weight("b_proj", "h.{i}.attn.c_proj.bias", ("hidden_size",)),
    Weight("ln2_g", "h.{i}.ln_2.weight", ("hidden_size",)),
    Weight("ln2_b", "h.{i}.ln_2.bias", ("hidden_size",)),
    Weight("w_fc", "h.{i}.mlp.c_fc.weight", ("hidden_size", "inner_size")),
    Weight("b_fc", "h.{i}.mlp.c_fc.bias", ("inner_size",)),
    Weight("w_out", "h.{i}.mlp.c_proj.weight", ("inner_size", "hidden_size")),
    Weight("b_out", "h.{i}.mlp.c_proj.bias", ("hidden_size",)),
)


@dataclass
class _Layer:
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w_attn: np.ndarray  # (D, 3D)
    b_attn: np.ndarray
    w_proj: np.ndarray  # (D, D)
    b_proj: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray
    w_fc: np.ndarray  # (D, F)
    b_fc: np.ndarray
    w_out: np.ndarray  # (F, D)
    b_out: np.ndarray
    scale: float


class GPT2Model(Decoder):
    """A GPT-2-family decoder with its tied LM head, running on fastattn's kernels. Build it with
    ``fastattn.models.load``.

    Examples
    --------
    >>> import numpy as np, fastattn.models
    >>> model = fastattn.models.load("path/to/gpt2")                         # doctest: +SKIP
    >>> model(np.array([[464, 3290]])).logits.shape                          # doctest: +SKIP
    (1, 2, 50257)
    >>> out = model.generate(np.array([[464, 3290]]), max_new_tokens=20)     # doctest: +SKIP
    >>> out.sequences.shape, out.tokens_per_second > 0                       # doctest: +SKIP
    ((1, 22), True)
    """

    config_class = GPT2Config
    prefixes = ("wte.weight", ("", "transformer."))

    @classmethod
    def _weights(cls, store, cfg: GPT2Config, dtype) -> dict:
        w = read_weights(
            store, TENSORS, cfg, dtype, layers=cfg.num_layers, layer_map=LAYER_TENSORS,
            layer_what=lambda i: f"layer {i} of n_layer={cfg.num_layers}",
        )  # fmt: skip
        layers = []
        for i, raw in enumerate(w["layers"]):
            scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            layers.append(_Layer(**raw, scale=scale))
        w["layers"] = layers
        # the LM head as (D, V): a transposed view, which BLAS reads in place
        w["lm_head"] = w["wte"].T if cfg.tie_word_embeddings else np.ascontiguousarray(w["lm_head"].T)
        return w

    def _cache_shape(self):
        return self.config.num_heads, self.config.head_dim, 0

    # ----------------------------------------------------------------------------------------------------------
    # Training (fastattn/models/_train.py holds the training forward and backward)
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def init(cls, config, *, seed: int = 0, backend=None, dtype=np.float32) -> GPT2Model:
        """A new model with GPT-2's initialisation, for training from scratch.

        ``config`` is a ``GPT2Config`` or a config.json dict. Weights and embeddings are normal with std 0.02, the
        residual projections (``c_proj``) with std 0.02 / √(2·n_layer), biases 0, LayerNorm scales 1.

        Examples
        --------
        >>> from fastattn.models import GPT2Model
        >>> model = GPT2Model.init({"vocab_size": 256, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2})
        >>> model.parameters()["h.0.attn.c_attn.weight"].shape
        (32, 96)
        """
        from . import _train

        cfg = config if isinstance(config, GPT2Config) else GPT2Config.from_dict(dict(config))
        dtype = V.float_dtype("dtype", dtype)
        return cls(cfg, _train.init_weights(cfg, V.positive_int("seed", seed, allow_zero=True), dtype),
                   backend=backend, dtype=dtype)  # fmt: skip

    from_config = init

    def parameters(self) -> dict:
        """The live weight arrays by checkpoint name (``"wte.weight"``, ``"h.0.attn.c_attn.weight"``, ...).

        Updating them in place (an optimizer's step) changes what the next forward computes. The tied LM head has
        no entry of its own: it is ``wte.weight``.
        """
        from . import _train

        return _train.parameters(self)

    def loss_and_grads(self, input_ids, labels=None, *, attention_mask=None, backend=None) -> tuple[float, dict]:
        """The mean next-token cross-entropy and the gradient of every tensor, as Hugging Face's
        ``GPT2LMHeadModel(input_ids, labels=labels, attention_mask=...).loss.backward()`` computes them.

        Parameters
        ----------
        input_ids : array_like of int, shape (B, L) or (L,)
        labels : array_like of int, shape of ``input_ids``, optional
            Default ``input_ids``. Position t is scored on ``labels[t + 1]`` (the model shifts); ``-100`` is
            ignored. The loss is the mean over the counted positions.
        attention_mask : array_like, shape (B, L), optional
            1 = token, 0 = padding (padded keys are never attended to; give their labels -100).

        Returns
        -------
        (loss, grads)
            ``loss`` a float; ``grads`` a dict from the checkpoint's tensor names (those of ``parameters()``) to
            arrays of the tensors' shapes and dtype; the tied LM head's gradient is added into ``wte.weight``'s.

        Examples
        --------
        >>> loss, grads = model.loss_and_grads(np.array([[1, 2, 3, 4]]))          # doctest: +SKIP
        >>> grads["h.0.attn.c_attn.weight"].shape                                 # doctest: +SKIP
        (32, 96)
        """
        from . import _train

        ids, labels, keep = _train.check_batch(self.config, input_ids, labels, attention_mask)
        return _train.loss_and_grads(self, ids, labels, keep, backend)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the checkpoint's names, the model's dtype) to ``path``,
        as Hugging Face's ``save_pretrained``: ``GPT2LMHeadModel.from_pretrained`` and ``fastattn.models.load``
        read it back."""
        from . import _train

        _train.save_pretrained(self, path)

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens (at most ``n_positions``)."""
        cfg = self.config
        batch = V.positive_int("batch", batch)
        capacity = V.positive_int("capacity", capacity)
        return KVCache(cfg.num_layers, batch, cfg.num_heads, capacity, cfg.head_dim, self.dtype)

    def _work(self, B: int, L: int, cache) -> dict:
        cfg, dt = self.config, self.dtype
        T, D, H, d, F = B * L, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.inner_size
        return {
            "h": np.empty((T, D), dt),  # the residual stream
            "a": np.empty((T, D), dt),  # its LayerNorm: the input of the next sublayer
            "qkv": np.empty((T, 3 * D), dt),
            "q": np.empty((B, H, L, d), dt),
            "o": np.empty((B, H, L, d), dt),
            "ctx": np.empty((T, D), dt),
            "proj": np.empty((T, D), dt),
            "f": np.empty((T, F), dt),
        }

    def _blocks(self, kern, blk, ids, positions, cache, work) -> np.ndarray:
        """Embeddings and every block; work["h"] (B·L, D) ends as the residual stream, work["a"] as its ln_f."""
        cfg, w = self.config, self._w
        B, L = ids.shape
        t = cache.rows
        D = cfg.hidden_size
        eps = cfg.layer_norm_eps
        layers = w["layers"]
        h, a, qkv, q, o = work["h"], work["a"], work["qkv"], work["q"], work["o"]
        ctx, proj, f = work["ctx"], work["proj"], work["f"]
        no_types = np.zeros(1, np.int64)
        blk.embedding(h, ids.reshape(-1), w["wte"], positions.reshape(-1), w["wpe"], no_types, w["wpe"][:1], False)
        first_g, first_b = (layers[0].ln1_g, layers[0].ln1_b) if layers else (w["lnf_g"], w["lnf_b"])
        blk.layer_norm(a, h, first_g, first_b, eps)
        bias = _ops.key_bias(cache.keep, self.dtype)  # (B, capacity): -inf at padding, None without
        act = getattr(blk, _ops.activation_kernel(cfg.activation, "activation_function"))
        for i, layer in enumerate(layers):
            keys, values = cache.keys[i], cache.values[i]  # (B, H, capacity, d) each
            np.matmul(a, layer.w_attn, out=qkv)  # (T, 3D)
            blk.split_qkv(q, keys, values, qkv.reshape(B, L, 3 * D), layer.b_attn, t)
            _call.attention_into(kern, o, q, keys, values, layer.scale, True, t, None, bias)  # key j <= t + i
            blk.merge_heads(ctx.reshape(B, L, D), o)
            np.matmul(ctx, layer.w_proj, out=proj)
            blk.bias_residual_and_layer_norm(h, a, proj, layer.b_proj, h, layer.ln2_g, layer.ln2_b, eps)
            np.matmul(a, layer.w_fc, out=f)  # (T, F)
            act(f, f, layer.b_fc)
            np.matmul(f, layer.w_out, out=proj)  # (T, D)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            g, b = (nxt.ln1_g, nxt.ln1_b) if nxt is not None else (w["lnf_g"], w["lnf_b"])
            blk.bias_residual_and_layer_norm(h, a, proj, layer.b_out, h, g, b, eps)
        return a
