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
never visits the rows beyond, so nothing is copied and nothing is recomputed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import _validation as V
from . import _ops
from ._checkpoint import CheckpointError, TensorStore, config_value, read_config
from .tokenizer import Tokenizer

__all__ = ["GPT2Config", "GPT2Model", "KVCache", "DecoderOutput", "GenerationOutput"]

MODEL_TYPES = ("gpt2",)
_FROM_CONFIG = object()  # generate(eos_token_id=...) default: the config's


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


@dataclass
class _Layer:
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w_attn: np.ndarray  # (D, 3D)  GPT-2's Conv1D is already (in, out): applied as x @ w
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


class KVCache:
    """Keys and values of every layer, preallocated: ``keys[layer]`` is (B, H, capacity, d), C-contiguous.

    ``length`` tokens are filled; ``keep`` (B, capacity) marks which of them are real tokens (False: padding,
    never attended to). Unfilled rows are zeros and hidden by the causal structure.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity: int, head_dim: int, dtype):
        shape = (num_layers, batch, num_heads, capacity, head_dim)
        self.keys = np.zeros(shape, dtype)
        self.values = np.zeros(shape, dtype)
        self.keep = np.ones((batch, capacity), bool)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` tokens (a copy; ``generate`` sizes the cache once and never grows it)."""
        if capacity <= self.capacity:
            return
        n, B, H, _, d = self.keys.shape
        old_k, old_v, old_keep = self.keys, self.values, self.keep
        self.keys = np.zeros((n, B, H, capacity, d), old_k.dtype)
        self.values = np.zeros_like(self.keys)
        self.keep = np.ones((B, capacity), bool)
        t = self.length
        self.keys[:, :, :, :t] = old_k[:, :, :, :t]
        self.values[:, :, :, :t] = old_v[:, :, :, :t]
        self.keep[:, :t] = old_keep[:, :t]


@dataclass
class DecoderOutput:
    """What ``GPT2Model.forward`` returns.

    Attributes
    ----------
    logits : ndarray, shape (B, L, vocab_size)
    past : KVCache or None
        The cache, now holding the new tokens too; pass it back as ``past`` to continue.
    last_hidden_state : ndarray, shape (B, L, D)
        After the final LayerNorm (``ln_f``), as Hugging Face's ``GPT2Model``.
    """

    logits: np.ndarray
    past: KVCache | None
    last_hidden_state: np.ndarray


@dataclass
class GenerationOutput:
    """What ``GPT2Model.generate`` returns: the ids and how fast they came. Behaves as the ids array.

    Attributes
    ----------
    sequences : ndarray of int64, shape (B, N + new_tokens)
        The prompt followed by the generated ids (finished rows padded with ``pad_token_id``).
    new_tokens : int
        Generated tokens per sequence.
    batch : int
        Number of sequences.
    prefill_seconds, decode_seconds : float
        Time of the prompt pass (which yields the first new token) and of the decode steps.
    tokens_per_second : float
        Generated tokens (all sequences) per second of the whole call.
    decode_tokens_per_second : float
        Tokens per second of the decode steps alone (one new token per sequence per step, from the cache).
    """

    sequences: np.ndarray
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    batch: int = 1

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.batch * self.new_tokens / total if total > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        if steps <= 0:
            return float("nan")
        return self.batch * steps / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def __array__(self, dtype=None, copy=None):
        return self.sequences if dtype is None else self.sequences.astype(dtype)

    def tolist(self):
        return self.sequences.tolist()

    @property
    def shape(self):
        return self.sequences.shape

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        return self.sequences[index]


class GPT2Model:
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

    def __init__(
        self,
        config: GPT2Config,
        weights: dict,
        *,
        backend=None,
        dtype=np.float32,
        tokenizer=None,
        path: str | None = None,
    ):
        self.config = config
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer
        self.path = path
        self._w = weights

    @classmethod
    def from_pretrained(cls, path, *, backend=None, dtype=np.float32, config: dict | None = None) -> GPT2Model:
        """Load ``path`` (``config.json`` + ``model.safetensors``, optionally ``tokenizer.json``)."""
        path = os.fspath(path)
        raw = read_config(path) if config is None else config
        cfg = GPT2Config.from_dict(raw)
        dtype = V.float_dtype("dtype", dtype)
        store = TensorStore(path)
        store.find_prefix("wte.weight", ("", "transformer."))
        D, F = cfg.hidden_size, cfg.inner_size
        get = store.get
        w = {
            "wte": get("wte.weight", (cfg.vocab_size, D), dtype, what="(vocab_size, n_embd)"),
            "wpe": get("wpe.weight", (cfg.max_positions, D), dtype, what="(n_positions, n_embd)"),
            "lnf_g": get("ln_f.weight", (D,), dtype),
            "lnf_b": get("ln_f.bias", (D,), dtype),
        }
        layers = []
        for i in range(cfg.num_layers):
            p = f"h.{i}."
            what = f"layer {i} of n_layer={cfg.num_layers}"
            scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            layers.append(
                _Layer(
                    ln1_g=get(p + "ln_1.weight", (D,), dtype, what=what),
                    ln1_b=get(p + "ln_1.bias", (D,), dtype, what=what),
                    w_attn=get(p + "attn.c_attn.weight", (D, 3 * D), dtype, what=what),
                    b_attn=get(p + "attn.c_attn.bias", (3 * D,), dtype, what=what),
                    w_proj=get(p + "attn.c_proj.weight", (D, D), dtype, what=what),
                    b_proj=get(p + "attn.c_proj.bias", (D,), dtype, what=what),
                    ln2_g=get(p + "ln_2.weight", (D,), dtype, what=what),
                    ln2_b=get(p + "ln_2.bias", (D,), dtype, what=what),
                    w_fc=get(p + "mlp.c_fc.weight", (D, F), dtype, what=what),
                    b_fc=get(p + "mlp.c_fc.bias", (F,), dtype, what=what),
                    w_out=get(p + "mlp.c_proj.weight", (F, D), dtype, what=what),
                    b_out=get(p + "mlp.c_proj.bias", (D,), dtype, what=what),
                    scale=scale,
                )
            )
        w["layers"] = layers
        if not cfg.tie_word_embeddings:
            saved_prefix, store.prefix = store.prefix, ""
            w["lm_head"] = np.ascontiguousarray(
                get("lm_head.weight", (cfg.vocab_size, D), dtype, what="tie_word_embeddings is false").T
            )
            store.prefix = saved_prefix
        else:
            w["lm_head"] = w["wte"].T  # (D, V) view: BLAS reads the transpose in place
        tokenizer = Tokenizer.load_optional(path, pad_id=cfg.pad_token_id)
        return cls(cfg, w, backend=backend, dtype=dtype, tokenizer=tokenizer, path=path)

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

    def forward(
        self,
        input_ids,
        attention_mask=None,
        past: KVCache | None = None,
        *,
        position_ids=None,
        use_cache: bool = True,
        backend=None,
    ) -> DecoderOutput:
        """Logits of every position; the keys and values go into ``past`` (a new cache when None).

        Parameters
        ----------
        input_ids : array_like of int, shape (B, L) or (L,)
            The new tokens.
        attention_mask : array_like, shape (B, past.length + L), optional
            Hugging Face's convention over the cached and the new tokens: 1 = token, 0 = padding.
        past : KVCache, optional
            The cache of the tokens before; it is extended in place (and grown if too small).
        position_ids : array_like of int, shape (B, L), optional
            Default ``past.length .. past.length + L - 1`` (as Hugging Face's forward).
        use_cache : bool
            Return the cache (``past``) in the output.

        Returns
        -------
        DecoderOutput
            ``logits`` (B, L, vocab_size), ``past``, ``last_hidden_state``.
        """
        cfg = self.config
        ids, squeeze = _ops.token_ids("input_ids", input_ids, cfg.vocab_size)
        B, L = ids.shape
        cache = past if past is not None else self.new_cache(B, max(L, 1))
        if not isinstance(cache, KVCache):
            raise TypeError(f"past must be a KVCache (from a previous forward or new_cache), got {type(past).__name__}")
        if cache.batch != B:
            raise ValueError(f"past holds {cache.batch} sequences but input_ids has {B}")
        t = cache.length
        keep = _ops.keep_mask("attention_mask", attention_mask, (B, t + L))
        positions = self._positions(position_ids, B, L, t)
        cache.reserve(t + L)
        if keep is not None:
            cache.keep[:, : t + L] = keep
        a = self._run(ids, positions, cache, backend)  # (B·L, D) after ln_f
        hidden = a.reshape(B, L, cfg.hidden_size)
        logits = (a @ self._w["lm_head"]).reshape(B, L, cfg.vocab_size)
        if squeeze:
            logits, hidden = logits[0], hidden[0]
        return DecoderOutput(logits=logits, past=cache if use_cache else None, last_hidden_state=hidden)

    __call__ = forward

    def _positions(self, position_ids, B: int, L: int, t: int) -> np.ndarray:
        cfg = self.config
        if position_ids is None:
            if t + L > cfg.max_positions:
                raise ValueError(f"{t} cached + {L} new tokens exceed the model's n_positions={cfg.max_positions}")
            return np.ascontiguousarray(np.broadcast_to(np.arange(t, t + L, dtype=np.int64), (B, L)))
        positions = _ops.token_ids("position_ids", position_ids, cfg.max_positions)[0]
        return np.ascontiguousarray(np.broadcast_to(positions, (B, L)))

    def _run(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache, backend) -> np.ndarray:
        """The blocks over L new tokens after cache.length cached ones; returns ln_f's output (B·L, D)."""
        cfg = self.config
        kern, blk = _ops.kernels(self.backend if backend is None else backend)
        T, D = ids.size, cfg.hidden_size
        h = np.empty((T, D), self.dtype)  # the residual stream
        a = np.empty((T, D), self.dtype)  # the LayerNorm of the stream: input of the next sublayer
        if T == 0:
            return a
        with _ops.threads_for(T * max(D, cfg.inner_size), kern, blk):  # a decode step: one thread
            self._blocks(kern, blk, ids, positions, cache, h, a)
        cache.length += ids.shape[1]
        return a

    def _blocks(self, kern, blk, ids, positions, cache, h, a) -> None:
        """Embeddings and every block; h (B·L, D) ends as the residual stream, a as its ln_f."""
        cfg, w = self.config, self._w
        dt = self.dtype
        B, L = ids.shape
        t = cache.length
        T, D, H, d, F = B * L, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.inner_size
        eps = cfg.layer_norm_eps
        layers = w["layers"]
        no_types = np.zeros(1, np.int64)
        blk.embedding(h, ids.reshape(-1), w["wte"], positions.reshape(-1), w["wpe"], no_types, w["wpe"][:1], False)
        first_g, first_b = (layers[0].ln1_g, layers[0].ln1_b) if layers else (w["lnf_g"], w["lnf_b"])
        blk.layer_norm(a, h, first_g, first_b, eps)
        bias = _ops.key_bias(cache.keep, dt)  # (B, capacity): -inf at padding, None without
        qkv = np.empty((T, 3 * D), dt)
        q = np.empty((B, H, L, d), dt)
        o = np.empty((B, H, L, d), dt)
        ctx = np.empty((T, D), dt)
        proj = np.empty((T, D), dt)
        f = np.empty((T, F), dt)
        act = getattr(blk, _ops.activation_kernel(cfg.activation, "activation_function"))
        for i, layer in enumerate(layers):
            keys, values = cache.keys[i], cache.values[i]  # (B, H, capacity, d) each
            np.matmul(a, layer.w_attn, out=qkv)  # (T, 3D)
            blk.split_qkv(q, keys, values, qkv.reshape(B, L, 3 * D), layer.b_attn, t)
            _ops.attend(kern, o, q, keys, values, layer.scale, True, t, bias)  # key j <= t + i
            blk.merge_heads(ctx.reshape(B, L, D), o)
            np.matmul(ctx, layer.w_proj, out=proj)
            blk.bias_residual_and_layer_norm(h, a, proj, layer.b_proj, h, layer.ln2_g, layer.ln2_b, eps)
            np.matmul(a, layer.w_fc, out=f)  # (T, F)
            act(f, f, layer.b_fc)
            np.matmul(f, layer.w_out, out=proj)  # (T, D)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            g, b = (nxt.ln1_g, nxt.ln1_b) if nxt is not None else (w["lnf_g"], w["lnf_b"])
            blk.bias_residual_and_layer_norm(h, a, proj, layer.b_out, h, g, b, eps)

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------
    def generate_text(self, prompt: str, max_new_tokens: int = 20, **kwargs) -> str:
        """Greedy continuation of ``prompt`` as text (needs ``tokenizer.json`` and the tokenizers package).

        Keyword arguments go to ``generate``. Returns only the new text.

        Examples
        --------
        >>> model.generate_text("The dog", max_new_tokens=5)      # doctest: +SKIP
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}; use generate() for token ids")
        tokenizer = self._require_tokenizer()
        ids = np.array(tokenizer.encode(prompt), dtype=np.int64)
        out = self.generate(ids, max_new_tokens, **kwargs)
        return tokenizer.decode(out.sequences[len(ids) :])

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            if self.path and os.path.isfile(os.path.join(self.path, "tokenizer.json")):
                from .tokenizer import import_tokenizers

                import_tokenizers()  # raises the ImportError with the install hint
            raise ValueError(f"{self.path or 'the model directory'} has no tokenizer.json: pass token ids instead")
        return self.tokenizer

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 20,
        *,
        attention_mask=None,
        eos_token_id=_FROM_CONFIG,
        pad_token_id: int | None = None,
        backend=None,
    ) -> GenerationOutput:
        """Greedy decoding with the KV cache, as Hugging Face's ``generate(do_sample=False)``.

        The prompt runs once (prefill); then each step feeds only the newest token, attending from its position
        to every cached one. Batched prompts of different lengths are padded on the left with
        ``attention_mask`` 0; positions count real tokens only (as Hugging Face does).

        Parameters
        ----------
        input_ids : array_like of int, shape (B, N) or (N,)
        max_new_tokens : int
        attention_mask : array_like, shape (B, N), optional
        eos_token_id : int or None
            Stop a sequence at this id (default: the config's; None: never stop early). Generation ends when
            every sequence has stopped.
        pad_token_id : int, optional
            Written after a sequence stopped (default: the config's, else ``eos_token_id``).

        Returns
        -------
        GenerationOutput
            ``sequences`` (prompt + new ids), ``tokens_per_second`` and timings; ``np.asarray(out)`` is the ids.
        """
        cfg = self.config
        ids, squeeze = _ops.token_ids("input_ids", input_ids, cfg.vocab_size)
        max_new_tokens = V.positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
        B, N = ids.shape
        if N == 0:
            raise ValueError("generate needs a prompt of at least one token")
        keep = _ops.keep_mask("attention_mask", attention_mask, (B, N))
        keep = np.ones((B, N), bool) if keep is None else keep
        eos = cfg.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
        positions = np.cumsum(keep, axis=1) - 1  # real tokens count 0, 1, 2, ...; padding sits at 0
        positions[~keep] = 0
        last = positions[:, -1].copy()
        if int(positions.max(initial=0)) + max_new_tokens >= cfg.max_positions + 1:
            raise ValueError(
                f"a prompt of {int(positions.max()) + 1} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's n_positions={cfg.max_positions}"
            )
        new = np.empty((B, max_new_tokens), np.int64)
        start = time.perf_counter()
        cache = self.new_cache(B, N + max(max_new_tokens - 1, 0))
        cache.keep[:, :N] = keep
        produced = 0
        prefill = 0.0
        if max_new_tokens:
            unfinished = np.ones(B, bool)
            a = self._run(ids, np.ascontiguousarray(positions), cache, backend)
            logits = a.reshape(B, N, -1)[:, -1] @ self._w["lm_head"]  # (B, V): only the last position
            prefill = time.perf_counter() - start
            while True:
                token = logits.argmax(axis=-1)  # (B,) greedy
                if eos is not None:
                    token = np.where(unfinished, token, pad)
                    unfinished &= token != eos
                new[:, produced] = token
                produced += 1
                if produced == max_new_tokens or (eos is not None and not unfinished.any()):
                    break
                last += 1
                a = self._run(token[:, None], last[:, None], cache, backend)  # one token per sequence
                logits = a @ self._w["lm_head"]  # (B, V)
        total = time.perf_counter() - start
        sequences = np.concatenate([ids, new[:, :produced]], axis=1)
        return GenerationOutput(
            sequences=sequences[0] if squeeze else sequences,
            new_tokens=produced,
            prefill_seconds=prefill,
            decode_seconds=total - prefill,
            batch=B,
        )
