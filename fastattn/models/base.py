"""The shared base of fastattn's models: tensor maps, loading, the KV cache, work buffers and generation.

An architecture is one file (``bert.py``, ``gpt2.py``, ``llama.py``) holding its config (a frozen dataclass with a
``from_dict``), its **tensor map** (``Weight`` rows: the checkpoint's tensor name, the model's name for it and its
shape in config fields) and its block. What they share lives here:

- ``read_weights(store, tensor_map, cfg, dtype)``: every tensor of the map read once, checked against the shape the
  config implies, missing or misshapen ones named in a ``CheckpointError``; per-layer rows use ``{i}``.
- ``Model``: the constructor every architecture has, and ``from_pretrained`` (config, tensors, tokenizer).
- ``Decoder(Model)``: ``forward`` / ``__call__`` -> ``DecoderOutput`` (logits, the cache), ``generate`` (greedy or
  sampled, Hugging Face's knobs), ``stream`` (the same, one step at a time), ``generate_text``. A decoder
  architecture supplies ``_blocks`` (embeddings and every block into the final norm) and ``_cache_shape``.
- ``KVCache``: keys and values of every layer preallocated once, plus the work buffers of each step shape
  (``workspace``), so that a decode step allocates nothing. A sliding-window model's cache keeps only the last
  ``window - 1`` positions a new token can see (older rows are dropped from the front, a chunk at a time).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import _validation as V
from . import _ops
from ._checkpoint import CheckpointError, DictStore, TensorStore, read_config
from .tokenizer import Tokenizer

__all__ = [
    "Weight",
    "read_weights",
    "Model",
    "Decoder",
    "KVCache",
    "DecoderOutput",
    "GenerationOutput",
]

FROM_CONFIG = object()  # generate(eos_token_id=...) default: the config's


# ----------------------------------------------------------------------------------------------------------------
# Tensor maps
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weight:
    """One row of an architecture's tensor map.

    Attributes
    ----------
    key : str
        The model's name for the array (``"wte"``, ``"w_q"``, ...).
    name : str
        The checkpoint's tensor name, ``{i}`` standing for the layer index (``"h.{i}.ln_1.weight"``).
    shape : tuple of str or int
        Config field names (or ints) giving the shape the config implies, e.g. ``("vocab_size", "hidden_size")``.
    what : str
        Said in the error when the tensor is missing or misshapen (``"(vocab_size, n_embd)"``).
    when : str or None
        A config field: the tensor is read only when it is true (``"tie_word_embeddings"`` false -> ``lm_head``).
    unless : str or None
        A config field: the tensor is read only when it is false.
    root : bool
        Looked up without the store's prefix (an LM head beside a ``transformer.`` / ``model.`` body).
    """

    key: str
    name: str
    shape: tuple
    what: str = ""
    when: str | None = None
    unless: str | None = None
    root: bool = False

    def wanted(self, cfg) -> bool:
        return (self.when is None or bool(getattr(cfg, self.when))) and (
            self.unless is None or not getattr(cfg, self.unless)
        )

    def dims(self, cfg) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(getattr(cfg, d)) for d in self.shape)


def read_weights(store, tensor_map, cfg, dtype, *, layers: int = 0, layer_map=(), layer_what=None) -> dict:
    """The arrays of ``tensor_map`` (and of ``layer_map`` for each of ``layers`` layers, as ``w["layers"][i]``).

    ``store`` is a ``TensorStore`` (or any object with its ``get(name, shape, dtype, what=)`` and ``prefix``);
    ``layer_what(i)`` says which layer a missing tensor belongs to.
    """
    w = {row.key: _read(store, row, row.name, cfg, dtype, row.what) for row in tensor_map if row.wanted(cfg)}
    w["layers"] = []
    for i in range(layers):
        what = layer_what(i) if layer_what else f"layer {i}"
        w["layers"].append(
            {row.key: _read(store, row, row.name.format(i=i), cfg, dtype, what) for row in layer_map if row.wanted(cfg)}
        )
    return w


def _read(store, row: Weight, name: str, cfg, dtype, what: str) -> np.ndarray:
    if not row.root:
        return store.get(name, row.dims(cfg), dtype, what=what)
    saved, store.prefix = store.prefix, ""
    try:
        return store.get(name, row.dims(cfg), dtype, what=what)
    finally:
        store.prefix = saved


# ----------------------------------------------------------------------------------------------------------------
# The model base
# ----------------------------------------------------------------------------------------------------------------
class Model:
    """What every architecture has: a config, its weights, a backend, a dtype, an optional tokenizer.

    Subclasses set ``config_class`` and ``prefixes`` (``(anchor tensor, candidate prefixes)``) and implement
    ``_weights(store, cfg, dtype) -> dict``.
    """

    config_class = None
    prefixes: tuple[str, tuple[str, ...]] = ("", ("",))

    def __init__(self, config, weights: dict, *, backend=None, dtype=np.float32, tokenizer=None, path=None):
        self.config = config
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer
        self.path = path
        self._w = weights

    @classmethod
    def from_pretrained(cls, path, *, backend=None, dtype=np.float32, config: dict | None = None, **extra):
        """Load a Hugging Face directory ``path`` (``config.json`` + ``model.safetensors``, ``tokenizer.json``)."""
        path = os.fspath(path)
        raw = read_config(path) if config is None else config
        cfg = cls.config_class.from_dict(raw)
        dtype = V.float_dtype("dtype", dtype)
        store = TensorStore(path)
        anchor, candidates = cls._prefixes(cfg)
        store.find_prefix(anchor, candidates)
        weights = cls._weights(store, cfg, dtype)
        tokenizer = Tokenizer.load_optional(path, pad_id=getattr(cfg, "pad_token_id", None))
        return cls(cfg, weights, backend=backend, dtype=dtype, tokenizer=tokenizer, path=path, **extra)

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict, *, backend=None, dtype=np.float32, tokenizer=None):
        """Build the model from a config dict (config.json's fields) and named arrays (the checkpoint's names,
        e.g. a PyTorch state dict as NumPy arrays), without files.

        Examples
        --------
        >>> state = {k: v.numpy() for k, v in hf_model.state_dict().items()}                    # doctest: +SKIP
        >>> model = LlamaModel.from_tensors(hf_model.config.to_dict(), state)                  # doctest: +SKIP
        """
        cfg = cls.config_class.from_dict(config)
        dtype = V.float_dtype("dtype", dtype)
        store = DictStore(tensors)
        anchor, candidates = cls._prefixes(cfg)
        store.find_prefix(anchor, candidates)
        return cls(cfg, cls._weights(store, cfg, dtype), backend=backend, dtype=dtype, tokenizer=tokenizer)

    @classmethod
    def _prefixes(cls, cfg) -> tuple[str, tuple[str, ...]]:
        """(anchor tensor, prefixes to try): task checkpoints keep the body under e.g. ``bert.``."""
        return cls.prefixes

    @classmethod
    def _weights(cls, store, cfg, dtype) -> dict:
        raise NotImplementedError

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            if self.path and os.path.isfile(os.path.join(self.path, "tokenizer.json")):
                from .tokenizer import import_tokenizers

                import_tokenizers()  # raises the ImportError with the install hint
            raise ValueError(f"{self.path or 'the model directory'} has no tokenizer.json: pass token ids instead")
        return self.tokenizer


# ----------------------------------------------------------------------------------------------------------------
# KV cache and work buffers
# ----------------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer, preallocated: ``keys[layer]`` is (B, H, capacity, d), C-contiguous.

    ``length`` tokens have been seen; rows ``0 .. rows - 1`` hold the last ``rows`` of them (``rows == length``
    unless ``window`` dropped older ones: ``dropped`` of them). ``keep`` (B, capacity) marks which rows are real
    tokens (False: padding, never attended to). Unfilled rows are zeros and hidden by the causal structure.

    ``window`` (0: none) is a sliding-window model's W: a new token sees the W - 1 positions before it, so the cache
    never needs more than W - 1 old rows plus the new ones.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity: int, head_dim: int, dtype, window=0):
        shape = (num_layers, batch, num_heads, capacity, head_dim)
        self.keys = np.zeros(shape, dtype)
        self.values = np.zeros(shape, dtype)
        self.keep = np.ones((batch, capacity), bool)
        self.length = 0
        self.dropped = 0
        self.window = int(window)
        self._work: dict = {}

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def rows(self) -> int:
        """Filled rows (the tokens still held)."""
        return self.length - self.dropped

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` rows (a copy; ``generate`` sizes the cache once and never grows it)."""
        if capacity <= self.capacity:
            return
        n, B, H, _, d = self.keys.shape
        old_k, old_v, old_keep = self.keys, self.values, self.keep
        self.keys = np.zeros((n, B, H, capacity, d), old_k.dtype)
        self.values = np.zeros_like(self.keys)
        self.keep = np.ones((B, capacity), bool)
        t = self.rows
        self.keys[:, :, :, :t] = old_k[:, :, :, :t]
        self.values[:, :, :, :t] = old_v[:, :, :, :t]
        self.keep[:, :t] = old_keep[:, :t]

    def make_room(self, new: int) -> None:
        """Before a step of ``new`` tokens: with a window, drop rows no new token can see when they do not fit."""
        t = self.rows
        if not self.window or t + new <= self.capacity:
            return
        drop = t - (self.window - 1)  # keep the W - 1 newest rows
        if drop <= 0:
            return
        keep = t - drop
        self.keys[:, :, :, :keep] = self.keys[:, :, :, drop:t].copy()
        self.values[:, :, :, :keep] = self.values[:, :, :, drop:t].copy()
        self.keep[:, :keep] = self.keep[:, drop:t].copy()
        self.keep[:, keep:] = True
        self.dropped += drop

    def workspace(self, key, make):
        """The work buffers of a step shape ``key``, made by ``make()`` once and reused by every later step."""
        work = self._work.get(key)
        if work is None:
            work = self._work[key] = make()
        return work


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecoderOutput:
    """What a decoder's ``forward`` returns.

    Attributes
    ----------
    logits : ndarray, shape (B, L, vocab_size)
    past : KVCache or None
        The cache, now holding the new tokens too; pass it back as ``past`` to continue.
    last_hidden_state : ndarray, shape (B, L, D)
        After the final norm (GPT-2's ``ln_f``, Llama's ``norm``), as Hugging Face's base models return it.
    """

    logits: np.ndarray
    past: KVCache | None
    last_hidden_state: np.ndarray


@dataclass
class GenerationOutput:
    """What ``generate`` returns: the ids and how fast they came. Behaves as the ids array.

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
    prompt_tokens : int
        Tokens of the prompt pass (all sequences, padding included).
    tokens_per_second : float
        Generated tokens (all sequences) per second of the whole call.
    prefill_tokens_per_second : float
        Prompt tokens per second of the prompt pass.
    decode_tokens_per_second : float
        Tokens per second of the decode steps alone (one new token per sequence per step, from the cache).
    """

    sequences: np.ndarray
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    batch: int = 1
    prompt_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.batch * self.new_tokens / total if total > 0 else float("inf")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

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


# ----------------------------------------------------------------------------------------------------------------
# Sampling (Hugging Face's logits warpers: temperature, then top-k, then top-p)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """Greedy (``do_sample=False``) or sampling with Hugging Face's meaning of each knob, checked once."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def checked(cls, do_sample, temperature, top_k, top_p, seed) -> Sampler:
        do_sample = V.flag("do_sample", do_sample)
        if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, (int, float, np.number)):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
        temperature = float(temperature)
        if do_sample and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 when sampling (do_sample=True), got {temperature}; "
                "use do_sample=False for greedy decoding"
            )
        if top_k is not None:
            top_k = V.positive_int("top_k", top_k)
        if top_p is not None:
            if isinstance(top_p, (bool, np.bool_)) or not isinstance(top_p, (int, float, np.number)):
                raise TypeError(f"top_p must be a number in (0, 1], got {type(top_p).__name__} {top_p!r}")
            top_p = float(top_p)
            if not (0.0 < top_p <= 1.0):
                raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if seed is not None:
            seed = V.positive_int("seed", seed, allow_zero=True)
        return cls(do_sample, temperature, top_k, top_p, seed)

    def allowed(self, logits: np.ndarray) -> np.ndarray:
        """The warped log-weights (B, V) float64: ``-inf`` outside the allowed set of each row."""
        z = np.asarray(logits, np.float64) / self.temperature  # (B, V)
        V_ = z.shape[-1]
        if self.top_k is not None and self.top_k < V_:
            kth = np.partition(z, V_ - self.top_k, axis=-1)[:, V_ - self.top_k, None]  # (B, 1): the k-th largest
            z = np.where(z < kth, -np.inf, z)  # ties with the k-th are kept, as torch.topk's threshold does
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(z, axis=-1, kind="stable")  # ascending, as Hugging Face's TopPLogitsWarper
            zs = np.take_along_axis(z, order, axis=-1)
            p = np.exp(zs - zs[:, -1:])
            p /= p.sum(axis=-1, keepdims=True)
            remove = np.cumsum(p, axis=-1) <= 1.0 - self.top_p
            remove[:, -1] = False  # the most likely token always stays
            drop = np.zeros_like(remove)
            np.put_along_axis(drop, order, remove, axis=-1)
            z = np.where(drop, -np.inf, z)
        return z

    def choose(self, logits: np.ndarray, rng) -> np.ndarray:
        """The next token of each row (B,) int64."""
        if not self.do_sample:
            return logits.argmax(axis=-1)
        z = self.allowed(logits)
        p = np.exp(z - z.max(axis=-1, keepdims=True))  # (B, V), 0 outside the allowed set
        cdf = np.cumsum(p, axis=-1)
        u = rng.random(len(z)) * cdf[:, -1]  # (B,)
        token = (cdf <= u[:, None]).sum(axis=-1)  # first index whose cdf exceeds u
        return np.minimum(token, z.shape[-1] - 1).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------------------------
class Decoder(Model):
    """A causal decoder: logits with a KV cache, and generation. Architectures implement ``_blocks``.

    Config fields every decoder config has: ``vocab_size``, ``hidden_size``, ``num_layers``, ``max_positions``,
    ``eos_token_id`` (an int, a tuple of ints, or None), ``pad_token_id``; and ``positions_key``, the config.json
    name of ``max_positions`` used in messages.
    """

    # -- subclass hooks ------------------------------------------------------------------------------------------
    def _cache_shape(self) -> tuple[int, int, int]:
        """(key/value heads, head dim, window) of the cache."""
        raise NotImplementedError

    def _blocks(self, kern, blk, ids, positions, cache, work) -> np.ndarray:
        """Embeddings and every block over the new tokens; returns the final norm's output (B·L, D)."""
        raise NotImplementedError

    def _work(self, B: int, L: int, cache: KVCache) -> dict:
        """The buffers of a step of L tokens in each of B sequences (reused by later steps of that shape)."""
        raise NotImplementedError

    def _logits(self, a: np.ndarray, backend) -> np.ndarray:
        """Logits (T, V) of the final norm's output a (T, D)."""
        return a @ self._w["lm_head"]

    def _fits(self, t: int, L: int) -> None:
        """Raise if ``t`` cached + ``L`` new positions exceed the model's positions."""
        cfg = self.config
        if t + L > cfg.max_positions:
            raise ValueError(f"{t} cached + {L} new tokens exceed the model's {cfg.positions_key}={cfg.max_positions}")

    # -- forward -------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens."""
        cfg = self.config
        batch = V.positive_int("batch", batch)
        capacity = V.positive_int("capacity", capacity)
        heads, head_dim, window = self._cache_shape()
        return KVCache(cfg.num_layers, batch, heads, capacity, head_dim, self.dtype, window)

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
        cache.make_room(L)
        cache.reserve(cache.rows + L)
        if keep is not None:
            rows = cache.rows
            cache.keep[:, : rows + L] = keep[:, cache.dropped :]
        a = self._run(ids, positions, cache, backend)  # (B·L, D) after the final norm, a reused buffer
        hidden = a.reshape(B, L, cfg.hidden_size).copy()
        logits = self._logits(a, backend).reshape(B, L, cfg.vocab_size)
        if squeeze:
            logits, hidden = logits[0], hidden[0]
        return DecoderOutput(logits=logits, past=cache if use_cache else None, last_hidden_state=hidden)

    __call__ = forward

    def _positions(self, position_ids, B: int, L: int, t: int) -> np.ndarray:
        cfg = self.config
        if position_ids is None:
            self._fits(t, L)
            return np.ascontiguousarray(np.broadcast_to(np.arange(t, t + L, dtype=np.int64), (B, L)))
        positions = _ops.token_ids("position_ids", position_ids, cfg.max_positions)[0]
        return np.ascontiguousarray(np.broadcast_to(positions, (B, L)))

    def _run(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache, backend) -> np.ndarray:
        """The blocks over L new tokens after the cached ones; returns the final norm's output (B·L, D)."""
        cfg = self.config
        kern, blk = _ops.kernels(self.backend if backend is None else backend)
        B, L = ids.shape
        if B * L == 0:
            return np.empty((0, cfg.hidden_size), self.dtype)
        work = cache.workspace((B, L), lambda: self._work(B, L, cache))
        with _ops.threads_for(B * L * max(cfg.hidden_size, cfg.inner_size), kern, blk):  # a decode step: one thread
            a = self._blocks(kern, blk, ids, positions, cache, work)
        cache.length += L
        return a

    # -- generation ----------------------------------------------------------------------------------------------
    def generate_text(self, prompt: str, max_new_tokens: int = 20, **kwargs) -> str:
        """The continuation of ``prompt`` as text (needs a tokenizer). Keyword arguments go to ``generate``
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``streamer``, ...). Returns only the new
        text.

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

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 20,
        *,
        attention_mask=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id=FROM_CONFIG,
        pad_token_id: int | None = None,
        streamer=None,
        backend=None,
    ) -> GenerationOutput:
        """Greedy decoding or sampling with the KV cache, as Hugging Face's ``generate``.

        The prompt runs once (prefill); then each step feeds only the newest token, attending from its position
        to every cached one. Batched prompts of different lengths are padded on the left with
        ``attention_mask`` 0; positions count real tokens only (as Hugging Face does).

        Parameters
        ----------
        input_ids : array_like of int, shape (B, N) or (N,)
        max_new_tokens : int
        attention_mask : array_like, shape (B, N), optional
        do_sample : bool
            False: the most likely token each step (greedy). True: a token drawn from the softmax of the logits
            divided by ``temperature``, restricted to the ``top_k`` most likely and to the smallest set whose
            probability reaches ``top_p`` (Hugging Face's warpers, in that order). ``top_k=1`` is greedy.
        temperature : float
            > 0 when sampling.
        top_k : int, optional
            >= 1; None: no limit (note: Hugging Face's own default is 50).
        top_p : float, optional
            In (0, 1]; None or 1: no limit.
        seed : int, optional
            The same seed gives the same tokens, run after run; None: fresh randomness.
        eos_token_id : int, sequence of int, or None
            Stop a sequence at these ids (default: the config's; None: never stop early). Generation ends when
            every sequence has stopped.
        pad_token_id : int, optional
            Written after a sequence stopped (default: the config's, else the first end-of-sequence id).
        streamer : callable, optional
            Called with each step's new tokens, an int64 array (B,), as soon as they are chosen.

        Returns
        -------
        GenerationOutput
            ``sequences`` (prompt + new ids), ``tokens_per_second`` and timings; ``np.asarray(out)`` is the ids.

        Examples
        --------
        >>> out = model.generate(ids, max_new_tokens=20, do_sample=True, top_p=0.9, seed=0)   # doctest: +SKIP
        """
        if streamer is not None and not callable(streamer):
            raise TypeError(
                f"streamer must be callable (it receives each step's tokens), got {type(streamer).__name__}"
            )
        steps = self.stream(
            input_ids,
            max_new_tokens,
            attention_mask=attention_mask,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            backend=backend,
        )
        try:
            while True:
                token = next(steps)
                if streamer is not None:
                    streamer(token)
        except StopIteration as stop:
            return stop.value

    def stream(
        self,
        input_ids,
        max_new_tokens: int = 20,
        *,
        attention_mask=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id=FROM_CONFIG,
        pad_token_id: int | None = None,
        backend=None,
    ):
        """``generate`` one step at a time: an iterator of each step's new tokens (an int64 array (B,), or an int
        for a 1-D prompt). Its ``StopIteration.value`` (what ``generate`` returns) is the ``GenerationOutput``.
        The arguments are checked when the iterator is made.

        Examples
        --------
        >>> for token in model.stream(ids, max_new_tokens=20):            # doctest: +SKIP
        ...     print(tokenizer.decode([token]), end="", flush=True)
        """
        cfg = self.config
        ids, squeeze = _ops.token_ids("input_ids", input_ids, cfg.vocab_size)
        max_new_tokens = V.positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
        sampler = Sampler.checked(do_sample, temperature, top_k, top_p, seed)
        B, N = ids.shape
        if N == 0:
            raise ValueError("generate needs a prompt of at least one token")
        keep = _ops.keep_mask("attention_mask", attention_mask, (B, N))
        keep = np.ones((B, N), bool) if keep is None else keep
        eos = cfg.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id
        eos = _eos_ids(eos, cfg.vocab_size)
        if pad_token_id is None:
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
        else:
            pad = V.positive_int("pad_token_id", pad_token_id, allow_zero=True)
        positions = np.cumsum(keep, axis=1) - 1  # real tokens count 0, 1, 2, ...; padding sits at 0
        positions[~keep] = 0
        if int(positions.max(initial=0)) + max_new_tokens >= cfg.max_positions + 1:
            raise ValueError(
                f"a prompt of {int(positions.max()) + 1} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's {cfg.positions_key}={cfg.max_positions}"
            )
        return self._steps(ids, squeeze, keep, positions, max_new_tokens, sampler, eos, pad, backend)

    def _steps(self, ids, squeeze, keep, positions, max_new_tokens, sampler, eos, pad, backend):
        B, N = ids.shape
        rng = np.random.default_rng(sampler.seed)
        last = positions[:, -1].copy()
        new = np.empty((B, max_new_tokens), np.int64)
        start = time.perf_counter()
        window = self._cache_shape()[2]
        capacity = N + max(max_new_tokens - 1, 0)
        if window:  # W - 1 old rows and a chunk of new ones; rows beyond are dropped a chunk at a time
            capacity = min(capacity, max(N, window - 1 + 32))
        cache = self.new_cache(B, capacity)
        cache.keep[:, :N] = keep
        produced = 0
        prefill = 0.0
        if max_new_tokens:
            unfinished = np.ones(B, bool)
            a = self._run(ids, np.ascontiguousarray(positions), cache, backend)
            logits = self._logits(np.ascontiguousarray(a.reshape(B, N, -1)[:, -1]), backend)  # (B, V): the last
            prefill = time.perf_counter() - start
            stops = np.array(eos, np.int64)
            while True:
                token = sampler.choose(logits, rng)  # (B,)
                if eos:
                    token = np.where(unfinished, token, pad)
                    unfinished &= ~np.isin(token, stops)
                new[:, produced] = token
                produced += 1
                yield int(token[0]) if squeeze else token.copy()
                if produced == max_new_tokens or (eos and not unfinished.any()):
                    break
                last += 1
                cache.make_room(1)
                a = self._run(token[:, None], last[:, None], cache, backend)  # one token per sequence
                logits = self._logits(a, backend)  # (B, V)
        total = time.perf_counter() - start
        sequences = np.concatenate([ids, new[:, :produced]], axis=1)
        return GenerationOutput(
            sequences=sequences[0] if squeeze else sequences,
            new_tokens=produced,
            prefill_seconds=prefill,
            decode_seconds=total - prefill,
            batch=B,
            prompt_tokens=B * N,
        )


def _eos_ids(eos, vocab_size: int) -> tuple[int, ...]:
    """End-of-sequence ids as a tuple (empty: never stop): from an int, a sequence of ints, or None."""
    if eos is None:
        return ()
    values = [eos] if isinstance(eos, (int, np.integer)) and not isinstance(eos, bool) else eos
    try:
        out = tuple(V.positive_int("eos_token_id", e, allow_zero=True) for e in values)
    except TypeError:
        raise TypeError(f"eos_token_id must be an int, a sequence of ints or None, got {eos!r}") from None
    return out


def eos_from_config(value) -> tuple[int, ...] | None:
    """config.json's ``eos_token_id`` (an int or a list of ints) as a tuple, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


__all__ += ["Sampler", "CheckpointError", "eos_from_config"]
