"""The call layer: validated, normalised arrays in, a kernel call out.

Everything between the public API's checks and a raw kernel of ``fastattn._optable`` happens here, once: output
allocation, the stand-in for an absent mask, scalars in the types the contract names, the contiguous layouts the
kernels assume. ``fastattn.functional``, ``fastattn.model``, ``fastattn.models``, the tools (profiler, bench) and
``warmup`` all call kernels through these functions; none of them validates (that is the API's job) or chooses a
backend (the registry's): each takes the kernel module ``kern`` the caller resolved.
"""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=64)
def absent(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only zero-stride stand-in for an absent mask (kernels never read it); shared, as it cannot change."""
    return np.broadcast_to(np.zeros((1,) * len(shape), np.dtype(dtype)), shape)


def default_scale(head_dim: int) -> float:
    """1/√d; 1 for d = 0 (every score is an empty sum then, whatever the scale)."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


# --------------------------------------------------------------------------------------------------------------
# embedding and positions
# --------------------------------------------------------------------------------------------------------------
def gather(kern, ids: np.ndarray, table: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(..., D) rows of ``table`` for int64 ``ids`` already checked to lie in [0, V); into ``out`` when given (a
    checked C-contiguous (..., D) array, see ``_validation.out_array``)."""
    shape = ids.shape + (table.shape[1],)
    flat = np.empty((ids.size, table.shape[1]), dtype=table.dtype) if out is None else out.reshape(-1, table.shape[1])
    if flat.size:
        kern.gather(flat, np.ascontiguousarray(ids.reshape(-1)), np.ascontiguousarray(table))
    return flat.reshape(shape) if out is None else out


def gather_add_positions(kern, ids2: np.ndarray, table: np.ndarray, positions: np.ndarray, offset: int = 0):
    """(B, N, D): ``table[ids2] + positions[offset + n]`` in one pass."""
    B, N = ids2.shape
    out = np.empty((B * N, table.shape[1]), dtype=table.dtype)
    if out.size:
        kern.gather_add_positions(
            out,
            np.ascontiguousarray(ids2.reshape(-1)),
            np.ascontiguousarray(table),
            np.ascontiguousarray(positions),
            int(N),
            int(offset),
        )
    return out.reshape(B, N, table.shape[1])


def add_positions(kern, x: np.ndarray, positions: np.ndarray, offset: int, out=None) -> np.ndarray:
    """``x[..., n, :] + positions[offset + n]`` for x (..., N, D); into ``out`` (checked) when given."""
    out = np.empty(x.shape, dtype=x.dtype) if out is None else out
    if out.size:
        n, d = x.shape[-2], x.shape[-1]
        kern.add_positions(
            out.reshape(-1, n, d),
            np.ascontiguousarray(x).reshape(-1, n, d),
            np.ascontiguousarray(positions),
            int(offset),
        )
    return out


def rope_tables(n: int, d: int, offset: int, base: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (N, d/2) of the angles (offset + n) / base^(2i/d), computed in float64."""
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)  # (d/2,)
    theta = np.outer(np.arange(offset, offset + n, dtype=np.float64), inv_freq)  # (N, d/2)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def rope(kern, x: np.ndarray, offset: int, base: float, interleaved: bool, out=None, *, inverse: bool = False):
    """RoPE over the last two axes of x (..., N, d), into ``out`` (checked) when given; ``inverse`` rotates back
    (the gradient of RoPE: -sin)."""
    out = np.empty(x.shape, dtype=x.dtype) if out is None else out
    if out.size:
        n, d = x.shape[-2], x.shape[-1]
        cos, sin = rope_tables(n, d, offset, base, x.dtype)
        sin = -sin if inverse else sin
        kern.rope(out.reshape(-1, n, d), np.ascontiguousarray(x).reshape(-1, n, d), cos, sin, bool(interleaved))
    return out


# --------------------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------------------
def _masks(q, S, mask, key_bias):
    """(mask, has_mask, key_bias, has_key_bias) as the kernels take them: an absent one is a stand-in never read."""
    B, Hq, L, _ = q.shape
    has_mask, has_bias = mask is not None, key_bias is not None
    mask = mask if has_mask else absent(q.dtype, (B, Hq, L, S))
    key_bias = key_bias if has_bias else absent(q.dtype, (B, S))
    return mask, has_mask, key_bias, has_bias


def attention_into(kern, out, q, k, v, scale, causal, causal_offset=0, mask=None, key_bias=None, *, window=0,
                   lse=None) -> None:  # fmt: skip
    """The fused kernel into ``out`` (B, Hq, L, Ev): q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)
    contiguous; mask None or a (B, Hq, L, S) view; key_bias None or a (B, S) view; ``window`` 0 (none) or W > 0
    with ``causal``. Masks travel as structure. ``lse`` (B, Hq, L) receives the rows' log-sum-exp when given."""
    B, Hq, L, _ = q.shape
    if lse is None:
        lse = np.empty((B, Hq, L), q.dtype)  # the kernels always write it; this caller does not keep it
    mask, has_mask, key_bias, has_bias = _masks(q, k.shape[2], mask, key_bias)
    kern.attention(out, lse, q, k, v, float(scale), bool(causal), int(causal_offset), int(window), mask, has_mask,
                   key_bias, has_bias)  # fmt: skip


def attention(kern, q, k, v, scale, causal, causal_offset=0, mask=None, key_bias=None, out=None, *, window=0,
              want_lse=False):  # fmt: skip
    """A (B, Hq, L, Ev) output of the fused kernel (see ``attention_into``), fresh or ``out`` (a checked array of
    that many elements, C-contiguous, returned as given), and the (B, Hq, L) log-sum-exp with ``want_lse``. No key
    at all gives zeros (and lse ``-inf``)."""
    B, Hq, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    if out is None:
        given, out = None, np.zeros((B, Hq, L, Ev), dtype=q.dtype)
    else:
        given, out = out, out.reshape(B, Hq, L, Ev)
        if not S:
            out.fill(0)
    lse = np.full((B, Hq, L), -np.inf, q.dtype)
    if out.size and S:  # otherwise nothing to compute: every row attends to nothing -> zeros
        attention_into(kern, out, q, k, v, scale, causal, causal_offset, mask, key_bias, window=window, lse=lse)
    result = out if given is None else given
    return (result, lse) if want_lse else result


def attention_backward_into(kern, grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, scale, causal,
                            causal_offset=0, mask=None, key_bias=None, *, window=0) -> None:  # fmt: skip
    """The fused backward kernel into grad_q, grad_k, grad_v (shapes of q, k, v), flash style from out and lse."""
    mask, has_mask, key_bias, has_bias = _masks(q, k.shape[2], mask, key_bias)
    kern.attention_backward(grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, float(scale), bool(causal),
                            int(causal_offset), int(window), mask, has_mask, key_bias, has_bias)  # fmt: skip


def attention_backward(kern, grad_out, q, k, v, out, lse, scale, causal, causal_offset=0, mask=None, key_bias=None,
                       *, window=0):  # fmt: skip
    """Fresh (grad_q, grad_k, grad_v) of the fused kernel (see ``attention_backward_into``); zeros when there is
    nothing to attend."""
    grad_q, grad_k, grad_v = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if q.size and k.shape[2]:
        attention_backward_into(kern, grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, scale, causal,
                                causal_offset, mask, key_bias, window=window)  # fmt: skip
    return grad_q, grad_k, grad_v


def scores_into(kern, out, q, k, scale, causal, causal_offset=0, mask=None, key_bias=None, *, window=0) -> None:
    """The stage kernel into ``out`` (B, Hq, L, S): masked, scaled Q Kᵀ (masks as in ``attention_into``)."""
    mask, has_mask, key_bias, has_bias = _masks(q, k.shape[2], mask, key_bias)
    kern.scores(out, q, k, float(scale), bool(causal), int(causal_offset), int(window), mask, has_mask, key_bias,
                has_bias)  # fmt: skip


def scores(kern, q, k, scale, causal, causal_offset=0, mask=None, key_bias=None, *, window=0) -> np.ndarray:
    """A fresh (B, Hq, L, S) output of the stage kernel (see ``scores_into``)."""
    out = np.empty(q.shape[:3] + (k.shape[2],), dtype=q.dtype)
    scores_into(kern, out, q, k, scale, causal, causal_offset, mask, key_bias, window=window)
    return out


def project_heads(x3: np.ndarray, w: np.ndarray, b, h: int) -> np.ndarray:
    """(B, N, D) @ (D, h·d) (+ b) -> (B, h, N, d), contiguous for the kernels."""
    y = x3 @ w
    if b is not None:
        y += b
    B, N, hd = y.shape
    return np.ascontiguousarray(y.reshape(B, N, h, hd // h).transpose(0, 2, 1, 3))


def self_attention(
    kern, x3, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, n_heads, n_kv_heads, is_causal, key_bias, rope_args
) -> np.ndarray:
    """(B, N, D_out): projections, heads, RoPE (``rope_args`` = (offset, base, interleaved) or None), fused
    attention, merge, output projection. Every argument already validated (``functional.self_attention``)."""
    B, N, _ = x3.shape
    q = project_heads(x3, w_q, b_q, n_heads)  # (B, H, N, d)
    k = project_heads(x3, w_k, b_k, n_kv_heads)  # (B, Hkv, N, d)
    v = project_heads(x3, w_v, b_v, n_kv_heads)  # (B, Hkv, N, dv)
    if rope_args is not None:
        offset, base, interleaved = rope_args
        q = rope(kern, q, offset, base, interleaved)
        k = rope(kern, k, offset, base, interleaved)
    o = attention(kern, q, k, v, default_scale(q.shape[-1]), is_causal, 0, None, key_bias)  # (B, H, N, dv)
    o = o.transpose(0, 2, 1, 3).reshape(B, N, o.shape[1] * o.shape[3])  # merge heads: (B, N, H·dv)
    if w_o is not None:
        o = o @ w_o
    if b_o is not None:
        o += b_o
    return o
