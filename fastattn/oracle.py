"""The NumPy oracle: the forward pass written literally from the math.

Naive on purpose. Every fast kernel in fastattn is held against these functions, they are the always-available
``"numpy"`` backend, and they are the benchmark baseline. Clarity beats speed here: the embedding really is a
one-hot matrix times the table, the scores really are a full L x S matrix. Do not "optimise" this file.

Shapes use: B batch, N / L query length, S key length, V vocabulary, D model width, H heads, E / d head width.
Functions here do no argument checking beyond what NumPy itself does; the public API (``fastattn``) validates.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "one_hot",
    "embed",
    "sinusoidal_positions",
    "add_positions",
    "rope_angles",
    "apply_rope",
    "rotate",
    "causal_mask",
    "softmax",
    "attention_scores",
    "attention_weights",
    "scaled_dot_product_attention",
    "split_heads",
    "merge_heads",
    "self_attention",
    "forward",
]


# --------------------------------------------------------------------------------------------------------------
# 1. Embedding lookup
# --------------------------------------------------------------------------------------------------------------
def one_hot(token_ids, vocab_size, dtype=np.float64):
    """One-hot rows: ``out[..., v] = 1`` where ``v == token_ids[...]``. Shape (..., V)."""
    ids = np.asarray(token_ids)  # (...)
    vocab = np.arange(vocab_size)  # (V,)
    return (ids[..., None] == vocab).astype(dtype)  # (..., V)


def embed(token_ids, table):
    """Embedding lookup as the founding note states it: the one-hot matrix times the embedding matrix."""
    table = np.asarray(table)  # (V, D)
    hot = one_hot(token_ids, table.shape[0], dtype=table.dtype)  # (..., V)
    return hot @ table  # (..., V) @ (V, D) -> (..., D)


# --------------------------------------------------------------------------------------------------------------
# 2. Positional encoding
# --------------------------------------------------------------------------------------------------------------
def sinusoidal_positions(n_positions, d_model, base=10000.0):
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)). Shape (P, D), float64."""
    pe = np.zeros((n_positions, d_model))  # (P, D)
    for p in range(n_positions):
        for col in range(d_model):
            i = col // 2  # the pair index
            angle = p / base ** (2 * i / d_model)
            pe[p, col] = np.sin(angle) if col % 2 == 0 else np.cos(angle)
    return pe


def add_positions(x, positions, offset=0):
    """Add the position vectors ``positions[offset : offset + N]`` to the rows of ``x`` (..., N, D)."""
    n = np.shape(x)[-2]
    return x + positions[offset : offset + n]  # (..., N, D) + (N, D)


def rope_angles(n, d, offset=0, base=10000.0):
    """Rotation angles of rotary embedding: ``(offset + n) / base^(2i/d)`` for i < d/2. Shape (N, d/2)."""
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)  # (d/2,)
    pos = np.arange(offset, offset + n, dtype=np.float64)  # (N,)
    return np.outer(pos, inv_freq)  # (N, d/2)


def apply_rope(x, offset=0, base=10000.0, interleaved=False):
    """Rotary position embedding on (..., N, d), d even: rotate feature pairs by a position-dependent angle.

    ``interleaved=False`` pairs feature i with i + d/2 (GPT-NeoX, Hugging Face Llama); ``interleaved=True`` pairs
    2i with 2i + 1 (original Llama, GPT-J).
    """
    x = np.asarray(x)
    n, d = x.shape[-2], x.shape[-1]
    theta = rope_angles(n, d, offset, base)  # (N, d/2)
    return rotate(x, np.cos(theta).astype(x.dtype), np.sin(theta).astype(x.dtype), interleaved)


def rotate(x, cos, sin, interleaved=False):
    """Rotate the feature pairs of x (..., N, d) by angles given as cos, sin (N, d/2)."""
    d = x.shape[-1]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., N, d/2) each
    else:
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]  # (..., N, d/2) each
    r1 = x1 * cos - x2 * sin  # (..., N, d/2)
    r2 = x2 * cos + x1 * sin  # (..., N, d/2)
    out = np.empty_like(x)  # (..., N, d)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = r1, r2
    else:
        out[..., : d // 2], out[..., d // 2 :] = r1, r2
    return out


# --------------------------------------------------------------------------------------------------------------
# 3. Self-attention
# --------------------------------------------------------------------------------------------------------------
def causal_mask(L, S, offset=0):
    """Boolean (L, S): query i may see key j when j <= i + offset. offset 0 is PyTorch's top-left alignment."""
    i = np.arange(L)[:, None]  # (L, 1)
    j = np.arange(S)[None, :]  # (1, S)
    return j <= i + offset  # (L, S)


def softmax(s, axis=-1):
    """Softmax with the row max subtracted. A row that is all -inf (nothing to attend to) gives zeros."""
    s = np.asarray(s)
    m = np.max(s, axis=axis, keepdims=True)  # (..., 1)
    m = np.where(np.isneginf(m), 0.0, m)  # an all -inf row: keep exp(-inf) = 0 instead of nan
    e = np.exp(s - m)  # (..., S)
    z = np.sum(e, axis=axis, keepdims=True)  # (..., 1)
    return np.divide(e, z, out=np.zeros_like(e), where=z != 0)  # (..., S)


def attention_scores(q, k, scale, mask=None):
    """S = Q Kᵀ · scale, then the additive mask (0 where allowed, -inf where not). Shape (..., L, S)."""
    s = (q @ np.swapaxes(k, -1, -2)) * scale  # (..., L, E) @ (..., E, S) -> (..., L, S)
    if mask is not None:
        s = s + mask  # (..., L, S)
    return s


def attention_weights(q, k, scale, mask=None):
    """A = softmax(Q Kᵀ · scale + mask), row by row. Shape (..., L, S)."""
    return softmax(attention_scores(q, k, scale, mask))


def _additive(mask, dtype):
    """A boolean mask (True = takes part) as an additive one; a float mask as it is."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, -np.inf).astype(dtype)
    return mask.astype(dtype)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """softmax(Q Kᵀ / √E + mask) V with PyTorch's semantics, literally.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev). A boolean mask means True = takes
    part; a float mask is added to the scores. ``is_causal`` is the top-left lower triangle. With ``enable_gqa``
    each key/value head serves Hq/Hkv consecutive query heads. Rows with nothing to attend to give zeros.
    """
    if dropout_p:
        raise ValueError("the oracle is inference only: dropout_p must be 0")
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(E)
    if enable_gqa and q.ndim >= 3:
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)  # (..., Hq, S, E)
        v = np.repeat(v, group, axis=-3)  # (..., Hq, S, Ev)
    mask = None
    if is_causal:
        mask = _additive(causal_mask(L, S), q.dtype)  # (L, S)
    elif attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)  # broadcasts to (..., L, S)
    a = attention_weights(q, k, scale, mask)  # (..., L, S)
    return a @ v  # (..., L, S) @ (..., S, Ev) -> (..., L, Ev)


def split_heads(x, n_heads):
    """(B, N, H*d) -> (B, H, N, d)."""
    B, N, HD = x.shape
    return x.reshape(B, N, n_heads, HD // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, d) -> (B, N, H*d)."""
    B, H, N, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * d)


def self_attention(
    x,
    w_q,
    w_k,
    w_v,
    w_o=None,
    *,
    n_heads,
    n_kv_heads=None,
    b_q=None,
    b_k=None,
    b_v=None,
    b_o=None,
    is_causal=False,
    key_padding_mask=None,
    rope=None,
):
    """Multi-head self-attention of x (B, N, D): Q = X W_q, K = X W_k, V = X W_v, heads, mask, output projection.

    ``key_padding_mask`` (B, N): boolean True = padding (ignored, as in PyTorch's ``MultiheadAttention``), or a
    float mask added to the scores of each key. ``rope``: None, or a mapping with ``base``, ``interleaved``,
    ``offset`` applied to queries and keys of each head.
    """
    x = np.asarray(x)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    q = x @ w_q  # (B, N, D) @ (D, H*d) -> (B, N, H*d)
    k = x @ w_k  # (B, N, Hkv*d)
    v = x @ w_v  # (B, N, Hkv*dv)
    if b_q is not None:
        q = q + b_q
    if b_k is not None:
        k = k + b_k
    if b_v is not None:
        v = v + b_v
    q = split_heads(q, n_heads)  # (B, H, N, d)
    k = split_heads(k, n_kv_heads)  # (B, Hkv, N, d)
    v = split_heads(v, n_kv_heads)  # (B, Hkv, N, dv)
    if rope is not None:
        q = apply_rope(q, rope.get("offset", 0), rope.get("base", 10000.0), rope.get("interleaved", False))
        k = apply_rope(k, rope.get("offset", 0), rope.get("base", 10000.0), rope.get("interleaved", False))
    N = x.shape[-2]
    mask = np.zeros((x.shape[0], 1, N, N), dtype=x.dtype)  # (B, 1, N, N), additive
    if is_causal:
        mask = mask + _additive(causal_mask(N, N), x.dtype)  # (N, N)
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask)
        pad = np.where(kpm, -np.inf, 0.0) if kpm.dtype == np.bool_ else kpm  # (B, N)
        mask = mask + pad[:, None, None, :].astype(x.dtype)  # (B, 1, 1, N)
    o = scaled_dot_product_attention(q, k, v, mask, enable_gqa=n_kv_heads != n_heads)  # (B, H, N, dv)
    o = merge_heads(o)  # (B, N, H*dv)
    if w_o is not None:
        o = o @ w_o  # (B, N, H*dv) @ (H*dv, D) -> (B, N, D)
    if b_o is not None:
        o = o + b_o
    return o


def forward(token_ids, params, *, is_causal=False, key_padding_mask=None):
    """The whole founding note: embed (one-hot product) -> add positions -> self-attention."""
    x = embed(token_ids, params.embedding)  # (B, N, D)
    x = add_positions(x, params.positions)  # (B, N, D)
    return self_attention(
        x,
        params.w_q,
        params.w_k,
        params.w_v,
        params.w_o,
        n_heads=params.n_heads,
        n_kv_heads=params.n_kv_heads,
        b_q=params.b_q,
        b_k=params.b_k,
        b_v=params.b_v,
        b_o=params.b_o,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
    )
