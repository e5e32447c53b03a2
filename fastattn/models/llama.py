"""Llama-family decoders (``model_type`` llama, mistral, qwen2, qwen3) on fastattn's kernels.

One block, pre-RMSNorm, as Hugging Face's ``LlamaDecoderLayer`` computes it, with the kernel that runs each line::

    a = RMSNorm_in(h)                                   (fused into the previous block's last kernel)
    q, k, v = heads(a @ [W_q | W_k | W_v] + b)          BLAS (the three weights side by side), split_qkv_rope:
                                                        bias (Qwen2), per-head RMSNorm of q and k (Qwen3), RoPE,
                                                        k and v written straight into the cache (Hkv <= Hq heads)
    o = softmax(q kᵀ / √d + causal + window + padding) v   the fused attention kernel; grouped-query heads read
                                                        their shared key/value head in place
    h = h + merge(o) @ W_o;  a = RMSNorm_post(h)        BLAS, merge_heads, add_rms_norm
    h = h + (silu(a W_gate) * (a W_up)) @ W_down        BLAS (gate | up side by side), silu_mul, BLAS, add_rms_norm
    a = RMSNorm_in of the next block (norm after the last)
    logits = a @ W_lmᵀ                                  the LM head (tied: the embedding table, read in place)

Weights keep Hugging Face's (out, in) layout: a prefill's matmuls are BLAS on the transposed views; a decode
step's (a few rows) are the block kernel ``linear``, dot products along the weight rows (``_ops.linear``).

RoPE follows the config's ``rope_theta`` and ``rope_scaling`` / ``rope_parameters`` types as transformers 5 computes
them (``inv_freq`` and the attention scaling that multiplies cos and sin): ``default``, ``linear``, ``dynamic``,
``llama3``, ``yarn``. ``dynamic`` rescales only beyond ``max_position_embeddings``, which this model refuses, so
within the model's positions it is ``default``. Sliding-window layers (Mistral's ``sliding_window``; Qwen2/Qwen3
with ``use_sliding_window`` from layer ``max_window_layers`` on; or ``layer_types``) see the last W positions only;
when every layer slides, the cache keeps only the last W - 1 positions besides the new ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import _call
from . import _ops
from ._checkpoint import CheckpointError, config_value
from .base import Decoder, Weight, eos_from_config, read_weights

__all__ = ["LlamaConfig", "LlamaModel", "MODEL_TYPES", "rope_parameters"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


# ----------------------------------------------------------------------------------------------------------------
# RoPE frequencies (transformers' modeling_rope_utils, for the types these models use)
# ----------------------------------------------------------------------------------------------------------------
def rope_parameters(config: dict, head_dim: int, max_positions: int) -> tuple[str, np.ndarray, float]:
    """(rope type, inv_freq (head_dim // 2,) float64, attention scaling of cos and sin) from config.json.

    Reads transformers 5's ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` (``type`` or
    ``rope_type``). ``inv_freq`` is rounded to float32, the precision of transformers' buffer.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object, got {params!r}")
    if set(params) & {"full_attention", "sliding_attention"}:
        raise CheckpointError("config.json: per-layer-type rope_parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")
    dim = head_dim
    base = float(theta)
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (dim/2,)
    scaling = 1.0

    def need(name):
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"config.json: rope_scaling type {kind!r} needs a number {name!r}, got {value!r}")
        return float(value)

    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    original = max_positions if original is None else int(original)
    if kind == "linear":
        inv = inv / need("factor")
    elif kind == "dynamic":
        need("factor")  # rescales only beyond max_position_embeddings, where this model does not go
    elif kind == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor = params.get("factor")
        factor = max_positions / original if factor is None else need("factor")

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = params.get("attention_factor")
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None:
            attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        scaling = float(attention)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # as transformers: no division by zero
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp  # share of the unscaled frequency
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return kind, inv.astype(np.float32).astype(np.float64), scaling


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaConfig:
    """The fields of ``config.json`` that the decoder uses (Hugging Face names in the comments)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim, default hidden_size // num_attention_heads
    inner_size: int  # intermediate_size
    max_positions: int  # max_position_embeddings
    rms_norm_eps: float
    rope_type: str
    inv_freq: tuple  # (head_dim // 2,) RoPE inverse frequencies
    rope_scaling: float  # multiplies cos and sin (yarn's attention factor)
    qkv_bias: bool  # Qwen2; Llama's attention_bias
    o_bias: bool  # Llama's attention_bias
    mlp_bias: bool
    qk_norm: bool  # Qwen3
    windows: tuple  # per layer: the sliding window W, or 0
    tie_word_embeddings: bool
    eos_token_id: tuple | None
    pad_token_id: int | None
    bos_token_id: int | None = None

    positions_key = "max_position_embeddings"  # config.json's name of max_positions, for messages

    @classmethod
    def from_dict(cls, config: dict) -> LlamaConfig:
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"config.json: model_type {model_type!r} is not a Llama-family type {MODEL_TYPES}")
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise CheckpointError(f"config.json: hidden_act={act!r} is not supported; Llama-family MLPs use 'silu'")
        D = config_value(config, "hidden_size", int)
        H = config_value(config, "num_attention_heads", int)
        if H == 0:
            raise CheckpointError("config.json: num_attention_heads must be >= 1")
        Hkv = config_value(config, "num_key_value_heads", int, default=H)
        if Hkv == 0 or H % Hkv:
            raise CheckpointError(
                f"config.json: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}"
            )
        d = config_value(config, "head_dim", int, default=0) or None
        if d is None:
            _ops.check_heads(D, H, "hidden_size", "num_attention_heads")
            d = D // H
        if d % 2:
            raise CheckpointError(f"config.json: head_dim={d} must be even for rotary embeddings")
        n_layers = config_value(config, "num_hidden_layers", int)
        max_pos = config_value(config, "max_position_embeddings", int)
        kind, inv, scaling = rope_parameters(config, d, max_pos)
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config_value(config, "vocab_size", int),
            hidden_size=D,
            num_layers=n_layers,
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=d,
            inner_size=config_value(config, "intermediate_size", int),
            max_positions=max_pos,
            rms_norm_eps=config_value(config, "rms_norm_eps", float, default=1e-6),
            rope_type=kind,
            inv_freq=tuple(float(x) for x in inv),
            rope_scaling=scaling,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            windows=_windows(config, model_type, n_layers),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            eos_token_id=eos_from_config(config.get("eos_token_id")),
            pad_token_id=config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else None,
            bos_token_id=config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def cache_window(self) -> int:
        """W when every layer slides (the cache may then drop old rows), else 0."""
        return self.windows[0] if self.windows and all(w == self.windows[0] for w in self.windows) else 0


def _windows(config: dict, model_type: str, n_layers: int) -> tuple[int, ...]:
    """The sliding window of each layer (0: full attention), as transformers derives ``layer_types``."""
    window = config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise CheckpointError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
    types = config.get("layer_types")
    if types is None:
        if model_type in ("qwen2", "qwen3"):
            start = config.get("max_window_layers", n_layers)
            types = ["sliding_attention" if window and i >= start else "full_attention" for i in range(n_layers)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * n_layers
    if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"config.json: layer_types must list full/sliding_attention per layer, got {types!r}")
    if "sliding_attention" in types and not window:
        raise CheckpointError("config.json: layer_types has sliding_attention layers but no sliding_window")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


# ----------------------------------------------------------------------------------------------------------------
# Tensor map (Hugging Face names under "model."; Linear weights are (out, in))
# ----------------------------------------------------------------------------------------------------------------
TENSORS = (
    Weight("embed", "embed_tokens.weight", ("vocab_size", "hidden_size"), "(vocab_size, hidden_size)"),
    Weight("norm", "norm.weight", ("hidden_size",)),
    Weight("lm_head", "lm_head.weight", ("vocab_size", "hidden_size"), "tie_word_embeddings is false",
           unless="tie_word_embeddings", root=True),
)  # fmt: skip
_P = "layers.{i}."
LAYER_TENSORS = (
    Weight("ln_in", _P + "input_layernorm.weight", ("hidden_size",)),
    Weight("wq", _P + "self_attn.q_proj.weight", ("q_size", "hidden_size")),
    Weight("wk", _P + "self_attn.k_proj.weight", ("kv_size", "hidden_size")),
    Weight("wv", _P + "self_attn.v_proj.weight", ("kv_size", "hidden_size")),
    Weight("bq", _P + "self_attn.q_proj.bias", ("q_size",), when="qkv_bias"),
    Weight("bk", _P + "self_attn.k_proj.bias", ("kv_size",), when="qkv_bias"),
    Weight("bv", _P + "self_attn.v_proj.bias", ("kv_size",), when="qkv_bias"),
    Weight("q_norm", _P + "self_attn.q_norm.weight", ("head_dim",), when="qk_norm"),
    Weight("k_norm", _P + "self_attn.k_norm.weight", ("head_dim",), when="qk_norm"),
    Weight("wo", _P + "self_attn.o_proj.weight", ("hidden_size", "q_size")),
    Weight("bo", _P + "self_attn.o_proj.bias", ("hidden_size",), when="o_bias"),
    Weight("ln_post", _P + "post_attention_layernorm.weight", ("hidden_size",)),
    Weight("wg", _P + "mlp.gate_proj.weight", ("inner_size", "hidden_size")),
    Weight("wu", _P + "mlp.up_proj.weight", ("inner_size", "hidden_size")),
    Weight("wd", _P + "mlp.down_proj.weight", ("hidden_size", "inner_size")),
    Weight("bg", _P + "mlp.gate_proj.bias", ("inner_size",), when="mlp_bias"),
    Weight("bu", _P + "mlp.up_proj.bias", ("inner_size",), when="mlp_bias"),
    Weight("bd", _P + "mlp.down_proj.bias", ("hidden_size",), when="mlp_bias"),
)


@dataclass
class _Layer:
    ln_in: np.ndarray  # (D,)
    w_qkv: np.ndarray  # ((Hq + 2 Hkv) d, D): Hugging Face's (out, in) layout, applied as x @ wᵀ
    b_qkv: np.ndarray  # ((Hq + 2 Hkv) d,) zeros without biases
    q_norm: np.ndarray  # (d,) ones without Qwen3's norms
    k_norm: np.ndarray
    w_o: np.ndarray  # (D, Hq d)
    b_o: np.ndarray | None
    ln_post: np.ndarray
    w_gu: np.ndarray  # (2F, D): gate | up
    b_gu: np.ndarray | None
    w_down: np.ndarray  # (D, F)
    b_down: np.ndarray | None
    window: int


class LlamaModel(Decoder):
    """A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) on fastattn's kernels. Build it with
    ``fastattn.models.load`` (a Hugging Face directory or a GGUF file).

    Examples
    --------
    >>> import numpy as np, fastattn.models
    >>> model = fastattn.models.load("path/to/SmolLM2-135M")                 # doctest: +SKIP
    >>> model(np.array([[1, 504, 3458]])).logits.shape                       # doctest: +SKIP
    (1, 3, 49152)
    >>> model.generate_text("The capital of France is", max_new_tokens=8)    # doctest: +SKIP
    """

    config_class = LlamaConfig
    model_types = MODEL_TYPES
    prefixes = ("embed_tokens.weight", ("model.", ""))

    @classmethod
    def _weights(cls, store, cfg: LlamaConfig, dtype) -> dict:
        w = read_weights(
            store, TENSORS, cfg, dtype, layers=cfg.num_layers, layer_map=LAYER_TENSORS,
            layer_what=lambda i: f"layer {i} of num_hidden_layers={cfg.num_layers}",
        )  # fmt: skip
        layers = []
        width = cfg.q_size + 2 * cfg.kv_size
        ones = np.ones(cfg.head_dim, dtype)
        for i, raw in enumerate(w["layers"]):
            b_qkv = np.concatenate([raw["bq"], raw["bk"], raw["bv"]]) if cfg.qkv_bias else np.zeros(width, dtype)
            layers.append(
                _Layer(
                    ln_in=raw["ln_in"],
                    w_qkv=np.concatenate([raw["wq"], raw["wk"], raw["wv"]]),
                    b_qkv=np.ascontiguousarray(b_qkv, dtype=dtype),
                    q_norm=raw.get("q_norm", ones),
                    k_norm=raw.get("k_norm", ones),
                    w_o=raw["wo"],
                    b_o=raw.get("bo"),
                    ln_post=raw["ln_post"],
                    w_gu=np.concatenate([raw["wg"], raw["wu"]]),
                    b_gu=np.concatenate([raw["bg"], raw["bu"]]) if cfg.mlp_bias else None,
                    w_down=raw["wd"],
                    b_down=raw.get("bd"),
                    window=cfg.windows[i],
                )
            )
        w["layers"] = layers
        # the LM head (V, D), applied as a @ wᵀ: tied, the embedding table itself
        w["lm_head"] = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]
        w["inv_freq"] = np.array(cfg.inv_freq, np.float64)
        return w

    def _cache_shape(self):
        cfg = self.config
        return cfg.num_kv_heads, cfg.head_dim, cfg.cache_window

    def _work(self, B: int, L: int, cache) -> dict:
        cfg, dt = self.config, self.dtype
        T, D, Hq, d, F = B * L, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.inner_size
        return {
            "h": np.empty((T, D), dt),  # the residual stream
            "a": np.empty((T, D), dt),  # its RMSNorm: the input of the next sublayer
            "qkv": np.empty((T, cfg.q_size + 2 * cfg.kv_size), dt),
            "q": np.empty((B, Hq, L, d), dt),
            "o": np.empty((B, Hq, L, d), dt),
            "ctx": np.empty((T, cfg.q_size), dt),
            "proj": np.empty((T, D), dt),
            "gu": np.empty((T, 2 * F), dt),
            "f": np.empty((T, F), dt),
            "cos": np.empty((T, d // 2), dt),
            "sin": np.empty((T, d // 2), dt),
        }

    def _logits(self, a, backend):
        _, blk = _ops.kernels(self.backend if backend is None else backend)
        out = np.empty((a.shape[0], self.config.vocab_size), self.dtype)
        with _ops.threads_for(a.shape[0] * self.config.inner_size, blk):
            _ops.linear(blk, out, a, self._w["lm_head"])
        return out

    def _blocks(self, kern, blk, ids, positions, cache, work) -> np.ndarray:
        cfg, w = self.config, self._w
        B, L = ids.shape
        t = cache.rows
        eps = cfg.rms_norm_eps
        layers = w["layers"]
        h, a, qkv, q, o = work["h"], work["a"], work["qkv"], work["q"], work["o"]
        ctx, proj, gu, f, cos, sin = work["ctx"], work["proj"], work["gu"], work["f"], work["cos"], work["sin"]
        angles = positions.reshape(-1, 1).astype(np.float64) * w["inv_freq"]  # (T, d/2), in float64
        np.multiply(np.cos(angles), cfg.rope_scaling, out=cos, casting="same_kind")
        np.multiply(np.sin(angles), cfg.rope_scaling, out=sin, casting="same_kind")
        kern.gather(h, ids.reshape(-1), w["embed"])  # (T, D)
        blk.rms_norm(a, h, layers[0].ln_in if layers else w["norm"], eps)
        bias = _ops.key_bias(cache.keep, self.dtype)  # (B, capacity): -inf at padding, None without
        scale = 1.0 / math.sqrt(cfg.head_dim)
        for i, layer in enumerate(layers):
            keys, values = cache.keys[i], cache.values[i]  # (B, Hkv, capacity, d) each
            _ops.linear(blk, qkv, a, layer.w_qkv)  # (T, (Hq + 2 Hkv) d)
            blk.split_qkv_rope(
                q, keys, values, qkv.reshape(B, L, -1), layer.b_qkv, layer.q_norm, layer.k_norm, eps,
                cfg.qk_norm, cos, sin, t,
            )  # fmt: skip
            _call.attention_into(kern, o, q, keys, values, scale, True, t, None, bias, window=layer.window)  # j<=t+i
            blk.merge_heads(ctx.reshape(B, L, cfg.q_size), o)
            _ops.linear(blk, proj, ctx, layer.w_o)  # (T, D)
            if layer.b_o is not None:
                proj += layer.b_o
            blk.add_rms_norm(h, a, proj, h, layer.ln_post, eps)  # h += attention; a = RMSNorm(h)
            _ops.linear(blk, gu, a, layer.w_gu)  # (T, 2F)
            if layer.b_gu is not None:
                gu += layer.b_gu
            blk.silu_mul(f, gu)  # (T, F)
            _ops.linear(blk, proj, f, layer.w_down)  # (T, D)
            if layer.b_down is not None:
                proj += layer.b_down
            g = layers[i + 1].ln_in if i + 1 < len(layers) else w["norm"]
            blk.add_rms_norm(h, a, proj, h, g, eps)  # h += MLP; a = the next norm of h
        return a
