"""The ``"numpy"`` backend: the raw kernel contract (kernels/README.md) fulfilled by the oracle's literal math.

Always available, always right, slow. Each kernel writes into ``out`` like the compiled ones, so the public API
drives every backend the same way.
"""

from __future__ import annotations

import numpy as np

from . import oracle

_ONE_HOT_BUDGET = 1 << 24  # elements of one-hot matrix built at a time (64 MiB in float32)


def gather(out, ids, table):
    rows = max(1, _ONE_HOT_BUDGET // max(1, table.shape[0]))
    for start in range(0, ids.shape[0], rows):  # the one-hot product, a block of tokens at a time
        out[start : start + rows] = oracle.embed(ids[start : start + rows], table)


def gather_add_positions(out, ids, table, positions, seq_len, offset):
    gather(out, ids, table)
    x = out.reshape(-1, seq_len, out.shape[-1])  # (B, N, D), a view of out
    x[...] = oracle.add_positions(x, positions, offset)


def add_positions(out, x, positions, offset):
    out[...] = oracle.add_positions(x, positions, offset)


def rope(out, x, cos, sin, interleaved):
    out[...] = oracle.rotate(x, cos, sin, interleaved)


def _additive_mask(L, S, dtype, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
    """The additive (B or 1, H or 1, L, S) mask that the kernels take as structure, built literally."""
    total = np.zeros((1, 1, L, S), dtype=dtype)
    if causal:
        total = total + np.where(oracle.causal_mask(L, S, causal_offset, window), 0.0, -np.inf).astype(dtype)
    if has_mask:
        total = total + mask
    if has_key_bias:
        total = total + key_bias[:, None, None, :]
    return total


def _expand_kv(t, n_heads):
    """GQA, literally: repeat each key/value head for the query heads it serves."""
    return np.repeat(t, n_heads // t.shape[1], axis=1)


def _sum_groups(t, n_kv_heads):
    """GQA backward, literally: sum the gradients of the query heads each key/value head serves."""
    B, H = t.shape[:2]
    return t.reshape((B, n_kv_heads, H // n_kv_heads) + t.shape[2:]).sum(axis=2)


def scores(out, q, k, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
    L, S = q.shape[2], k.shape[2]
    m = _additive_mask(L, S, q.dtype, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    out[...] = oracle.attention_scores(q, _expand_kv(k, q.shape[1]), q.dtype.type(scale), m)


def softmax(out, s):
    out[...] = oracle.softmax(s)


def weighted_sum(out, p, v):
    out[...] = p @ _expand_kv(v, p.shape[1])


def attention(out, lse, q, k, v, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
    s = np.empty(q.shape[:3] + (k.shape[2],), dtype=q.dtype)
    scores(s, q, k, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    lse[...] = oracle.logsumexp(s)
    softmax(s, s)
    weighted_sum(out, s, v)


# ------------------------------------------------------------------------------------------------ backward
def gather_backward(grad_table, grad_out, ids):
    grad_table[...] = 0
    rows = max(1, _ONE_HOT_BUDGET // max(1, grad_table.shape[0]))
    for start in range(0, ids.shape[0], rows):  # the transposed one-hot product, a block of tokens at a time
        grad_table += oracle.embed_backward(grad_out[start : start + rows], ids[start : start + rows], len(grad_table))


def add_positions_backward(grad_positions, grad_out, offset):
    grad_positions[...] = oracle.add_positions_backward(grad_out, grad_positions.shape[0], offset)


def softmax_backward(grad_s, grad_p, p):
    grad_s[...] = oracle.softmax_backward(grad_p, p)


def scores_backward(grad_q, grad_k, grad_s, q, k, scale):
    gq, gk = oracle.attention_scores_backward(grad_s, q, _expand_kv(k, q.shape[1]), q.dtype.type(scale))
    grad_q[...] = gq
    grad_k[...] = _sum_groups(gk, k.shape[1])


def weighted_sum_backward(grad_p, grad_v, grad_out, p, v):
    grad_p[...] = grad_out @ np.swapaxes(_expand_kv(v, p.shape[1]), -1, -2)  # (B, Hq, L, Ev) @ (B, Hq, Ev, S)
    grad_v[...] = _sum_groups(np.swapaxes(p, -1, -2) @ grad_out, v.shape[1])  # (B, Hq, S, L) @ (B, Hq, L, Ev)


def attention_backward(grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, scale, causal, causal_offset, window,
                       mask, has_mask, key_bias, has_key_bias):  # fmt: skip
    """The flash-style recipe with the full L x S matrices: P recomputed from lse, dS = P (dP - D).

    D is the row term of P's own rows, rowsum(dP * P) / rowsum(P) in float64, rather than the compiled kernels'
    rowsum(grad_out * out) (they see a row a tile at a time; see kernels/numba/attention_backward.py): equal in
    exact arithmetic, but ``out`` and ``lse`` come from a forward whose scores were rounded its own way, and any
    difference from the P recomputed here breaks rowsum(dS) = 0, which dQ = dS K amplifies by |K|."""
    s = np.empty(q.shape[:3] + (k.shape[2],), dtype=q.dtype)  # (B, Hq, L, S)
    scores(s, q, k, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias)
    seen = ~np.isneginf(lse)[..., None]  # (B, Hq, L, 1): rows with a key to attend to
    with np.errstate(invalid="ignore"):
        p = np.where(seen, np.exp(s - np.where(seen, lse[..., None], 0)), 0).astype(q.dtype)  # (B, Hq, L, S)
    grad_p = np.empty_like(p)
    weighted_sum_backward(grad_p, grad_v, grad_out, p, v)
    p64 = p.astype(np.float64)
    total = np.sum(p64, axis=-1, keepdims=True)  # (B, Hq, L, 1)
    dot = np.sum(grad_p * p64, axis=-1, keepdims=True)  # (B, Hq, L, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(total > 0, dot / np.where(total > 0, total, 1.0), dot)  # a row without keys: P = 0, dS = 0
    grad_s = (p64 * (grad_p - d)).astype(q.dtype)  # (B, Hq, L, S)
    scores_backward(grad_q, grad_k, grad_s, q, k, scale)


def get_num_threads():
    return 1


def set_num_threads(n):
    """The oracle is single-threaded NumPy; its thread count cannot change."""
