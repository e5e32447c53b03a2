"""The NumPy oracle: the forward and backward passes written literally from the math.

Naive on purpose. Every fast kernel in fastattn is held against these functions, they are the always-available
``"numpy"`` backend, and they are the benchmark baseline. Clarity beats speed here: the embedding really is a
one-hot matrix times the table, the scores really are a full L x S matrix. Do not "optimise" this file.

Shapes use: B batch, N / L query length, S key length, V vocabulary, D model width, H heads, E / d head width.
Functions here do no argument checking beyond what NumPy itself does; the public API (``fastattn``) validates.

Each forward function has its gradient beside it, named ``..._backward``: given ``grad_out``, the gradient of
``sum(grad_out * f(inputs))`` with respect to each input, written with the full matrices (one-hot, L x S
probabilities) like the forward. They are checked against central finite differences and torch.autograd.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "one_hot",
    "embed",
    "embed_backward",
    "sinusoidal_positions",
    "add_positions",
    "add_positions_backward",
    "rope_angles",
    "apply_rope",
    "apply_rope_backward",
    "rotate",
    "causal_mask",
    "softmax",
    "softmax_backward",
    "logsumexp",
    "attention_scores",
    "attention_scores_backward",
    "attention_weights",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_lse",
    "scaled_dot_product_attention_backward",
    "split_heads",
    "merge_heads",
    "self_attention",
    "self_attention_backward",
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


def embed_backward(grad_out, token_ids, vocab_size):
    """Gradient of the table: the one-hot matrix transposed times grad_out (each id's rows of grad_out summed)."""
    grad_out = np.asarray(grad_out)  # (..., D)
    hot = one_hot(token_ids, vocab_size, dtype=grad_out.dtype)  # (..., V)
    T = int(np.prod(grad_out.shape[:-1]))
    hot = hot.reshape(T, vocab_size)  # (T, V)
    return hot.T @ grad_out.reshape(T, grad_out.shape[-1])  # (V, T) @ (T, D) -> (V, D)


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


def add_positions_backward(grad_out, n_positions, offset=0):
    """Gradient of the positions table (P, D): rows offset..offset+N-1 get grad_out summed over the leading axes,
    every other row 0. (The gradient of x is grad_out itself.)"""
    grad_out = np.asarray(grad_out)  # (..., N, D)
    n, d = grad_out.shape[-2], grad_out.shape[-1]
    grad = np.zeros((n_positions, d), dtype=grad_out.dtype)  # (P, D)
    lead = int(np.prod(grad_out.shape[:-2]))  # the leading axes, flattened
    grad[offset : offset + n] = grad_out.reshape(lead, n, d).sum(axis=0)  # (N, D)
    return grad


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


def apply_rope_backward(grad_out, offset=0, base=10000.0, interleaved=False):
    """Gradient of apply_rope's input: the rotation is orthogonal, so its gradient is the inverse rotation."""
    grad_out = np.asarray(grad_out)  # (..., N, d)
    n, d = grad_out.shape[-2], grad_out.shape[-1]
    theta = rope_angles(n, d, offset, base)  # (N, d/2)
    cos, sin = np.cos(theta).astype(grad_out.dtype), np.sin(theta).astype(grad_out.dtype)
    return rotate(grad_out, cos, -sin, interleaved)  # rotate by -theta


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
def causal_mask(L, S, offset=0, window=0):
    """Boolean (L, S): query i may see key j when j <= i + offset. offset 0 is PyTorch's top-left alignment.

    ``window`` W > 0 also hides keys W or more positions back: visible iff i + offset - W < j <= i + offset.
    """
    i = np.arange(L)[:, None]  # (L, 1)
    j = np.arange(S)[None, :]  # (1, S)
    visible = j <= i + offset  # (L, S)
    if window:
        visible = visible & (j > i + offset - window)  # (L, S)
    return visible


def softmax(s, axis=-1):
    """Softmax with the row max subtracted. A row that is all -inf (nothing to attend to) gives zeros."""
    s = np.asarray(s)
    m = np.max(s, axis=axis, keepdims=True)  # (..., 1)
    m = np.where(np.isneginf(m), 0.0, m)  # an all -inf row: keep exp(-inf) = 0 instead of nan
    e = np.exp(s - m)  # (..., S)
    z = np.sum(e, axis=axis, keepdims=True)  # (..., 1)
    return np.divide(e, z, out=np.zeros_like(e), where=z != 0)  # (..., S)


def softmax_backward(grad_p, p):
    """Gradient of the scores through a row softmax: p * (grad_p - rowsum(grad_p * p)). p is softmax's output."""
    d = np.sum(grad_p * p, axis=-1, keepdims=True)  # (..., 1)
    return p * (grad_p - d)  # (..., S)


def logsumexp(s, axis=-1):
    """log(sum(exp(s))) along ``axis`` with the max subtracted; -inf for an all -inf row. Shape (...)."""
    s = np.asarray(s)
    m = np.max(s, axis=axis, keepdims=True)  # (..., 1)
    m = np.where(np.isneginf(m), 0.0, m)  # an all -inf row: sum(exp(-inf)) = 0, log 0 = -inf
    z = np.sum(np.exp(s - m), axis=axis)  # (...)
    with np.errstate(divide="ignore"):
        return np.log(z) + np.squeeze(m, axis)  # (...)


def attention_scores(q, k, scale, mask=None):
    """S = Q Kᵀ · scale, then the additive mask (0 where allowed, -inf where not). Shape (..., L, S)."""
    s = (q @ np.swapaxes(k, -1, -2)) * scale  # (..., L, E) @ (..., E, S) -> (..., L, S)
    if mask is not None:
        s = s + mask  # (..., L, S)
    return s


def attention_scores_backward(grad_s, q, k, scale):
    """Gradients of q and k through S = Q Kᵀ · scale (the mask is a constant): (grad_q, grad_k)."""
    grad_q = (grad_s @ k) * scale  # (..., L, S) @ (..., S, E) -> (..., L, E)
    grad_k = (np.swapaxes(grad_s, -1, -2) @ q) * scale  # (..., S, L) @ (..., L, E) -> (..., S, E)
    return grad_q, grad_k


def attention_weights(q, k, scale, mask=None):
    """A = softmax(Q Kᵀ · scale + mask), row by row. Shape (..., L, S)."""
    return softmax(attention_scores(q, k, scale, mask))


def _additive(mask, dtype):
    """A boolean mask (True = takes part) as an additive one; a float mask as it is."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, -np.inf).astype(dtype)
    return mask.astype(dtype)


def _attention_inputs(query, key, value, attn_mask, is_causal, scale, enable_gqa, window):
    """The arrays of PyTorch's semantics, literally: key/value heads repeated for GQA, the mask additive."""
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(E)
    group = 1
    if enable_gqa and q.ndim >= 3:
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)  # (..., Hq, S, E)
        v = np.repeat(v, group, axis=-3)  # (..., Hq, S, Ev)
    mask = None
    if is_causal:
        mask = _additive(causal_mask(L, S, 0, window or 0), q.dtype)  # (L, S)
    elif attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)  # broadcasts to (..., L, S)
    return q, k, v, scale, mask, group


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window=None
):
    """softmax(Q Kᵀ / √E + mask) V with PyTorch's semantics, literally.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev). A boolean mask means True = takes
    part; a float mask is added to the scores. ``is_causal`` is the top-left lower triangle; ``window`` W (with
    ``is_causal``) also hides keys W or more positions back. With ``enable_gqa`` each key/value head serves
    Hq/Hkv consecutive query heads. Rows with nothing to attend to give zeros.
    """
    if dropout_p:
        raise ValueError("the oracle is inference only: dropout_p must be 0")
    q, k, v, scale, mask, _ = _attention_inputs(query, key, value, attn_mask, is_causal, scale, enable_gqa, window)
    a = attention_weights(q, k, scale, mask)  # (..., L, S)
    return a @ v  # (..., L, S) @ (..., S, Ev) -> (..., L, Ev)


def scaled_dot_product_attention_lse(
    query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, window=None
):
    """The log-sum-exp of each row's scaled, masked scores, (..., L); -inf for a row with no key to attend to."""
    q, k, v, scale, mask, _ = _attention_inputs(query, key, value, attn_mask, is_causal, scale, enable_gqa, window)
    return logsumexp(attention_scores(q, k, scale, mask))  # (..., L)


def _sum_to(grad, shape):
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast (what autograd does)."""
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad  # leading axes the input did not have
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=ones, keepdims=True) if ones else grad  # axes of size 1 that were stretched


def scaled_dot_product_attention_backward(
    grad_out, query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, window=None
):
    """Gradients (grad_query, grad_key, grad_value) of sum(grad_out * scaled_dot_product_attention(...)).

    Each has its input's shape: summed back over broadcast axes, and over the query heads a key/value head
    serves with GQA. The mask gets no gradient. A row with no key to attend to contributes nothing.
    """
    q, k, v, scale, mask, group = _attention_inputs(query, key, value, attn_mask, is_causal, scale, enable_gqa, window)
    grad_out = np.asarray(grad_out)  # (..., L, Ev)
    a = attention_weights(q, k, scale, mask)  # (..., L, S)
    grad_v = np.swapaxes(a, -1, -2) @ grad_out  # (..., S, L) @ (..., L, Ev) -> (..., S, Ev)
    grad_a = grad_out @ np.swapaxes(v, -1, -2)  # (..., L, Ev) @ (..., Ev, S) -> (..., L, S)
    grad_s = softmax_backward(grad_a, a)  # (..., L, S)
    grad_q, grad_k = attention_scores_backward(grad_s, q, k, scale)  # (..., L, E), (..., S, E)
    if group > 1:  # GQA: a key/value head's gradient is the sum over the query heads it serves
        grad_k = grad_k.reshape(grad_k.shape[:-3] + (-1, group) + grad_k.shape[-2:]).sum(axis=-3)  # (..., Hkv, S, E)
        grad_v = grad_v.reshape(grad_v.shape[:-3] + (-1, group) + grad_v.shape[-2:]).sum(axis=-3)  # (..., Hkv, S, Ev)
    shapes = np.shape(query), np.shape(key), np.shape(value)
    return tuple(_sum_to(g, s) for g, s in zip((grad_q, grad_k, grad_v), shapes, strict=True))


def split_heads(x, n_heads):
    """(B, N, H*d) -> (B, H, N, d)."""
    B, N, HD = x.shape
    return x.reshape(B, N, n_heads, HD // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, d) -> (B, N, H*d)."""
    B, H, N, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * d)


def _self_attention_mask(x, is_causal, key_padding_mask):
    """The additive (B, 1, N, N) mask of self_attention: causal and/or key padding."""
    N = x.shape[-2]
    mask = np.zeros((x.shape[0], 1, N, N), dtype=x.dtype)  # (B, 1, N, N), additive
    if is_causal:
        mask = mask + _additive(causal_mask(N, N), x.dtype)  # (N, N)
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask)
        pad = np.where(kpm, -np.inf, 0.0) if kpm.dtype == np.bool_ else kpm  # (B, N)
        mask = mask + pad[:, None, None, :].astype(x.dtype)  # (B, 1, 1, N)
    return mask


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
    mask = _self_attention_mask(x, is_causal, key_padding_mask)  # (B, 1, N, N)
    o = scaled_dot_product_attention(q, k, v, mask, enable_gqa=n_kv_heads != n_heads)  # (B, H, N, dv)
    o = merge_heads(o)  # (B, N, H*dv)
    if w_o is not None:
        o = o @ w_o  # (B, N, H*dv) @ (H*dv, D) -> (B, N, D)
    if b_o is not None:
        o = o + b_o
    return o


def self_attention_backward(
    grad_out,
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
    """Gradients of sum(grad_out * self_attention(x, ...)): a dict with "x" and every weight and bias given.

    The forward is recomputed, then each step is undone in reverse order: output projection, merge of the heads,
    attention, rotary embedding, split of the heads, the three projections. x is (B, N, D).
    """
    x = np.asarray(x)  # (B, N, D)
    grad_out = np.asarray(grad_out)  # (B, N, D_out)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    B, N, D = x.shape
    rope_args = None
    if rope is not None:
        rope_args = (rope.get("offset", 0), rope.get("base", 10000.0), rope.get("interleaved", False))
    # forward, keeping what the backward needs
    q = split_heads(x @ w_q + (0 if b_q is None else b_q), n_heads)  # (B, H, N, d)
    k = split_heads(x @ w_k + (0 if b_k is None else b_k), n_kv_heads)  # (B, Hkv, N, d)
    v = split_heads(x @ w_v + (0 if b_v is None else b_v), n_kv_heads)  # (B, Hkv, N, dv)
    if rope_args is not None:
        q, k = apply_rope(q, *rope_args), apply_rope(k, *rope_args)  # (B, H, N, d), (B, Hkv, N, d)
    mask = _self_attention_mask(x, is_causal, key_padding_mask)  # (B, 1, N, N)
    gqa = n_kv_heads != n_heads
    o = merge_heads(scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa))  # (B, N, H*dv)
    grads = {}
    # backward
    if b_o is not None:
        grads["b_o"] = grad_out.sum(axis=(0, 1))  # (D_out,)
    grad_o = grad_out  # (B, N, H*dv) when there is no output projection
    if w_o is not None:
        grads["w_o"] = o.reshape(B * N, -1).T @ grad_out.reshape(B * N, -1)  # (H*dv, B*N) @ (B*N, D_out)
        grad_o = grad_out @ w_o.T  # (B, N, D_out) @ (D_out, H*dv) -> (B, N, H*dv)
    grad_oh = split_heads(grad_o, n_heads)  # (B, H, N, dv)
    grad_q, grad_k, grad_v = scaled_dot_product_attention_backward(grad_oh, q, k, v, mask, enable_gqa=gqa)
    if rope_args is not None:
        grad_q = apply_rope_backward(grad_q, *rope_args)  # (B, H, N, d)
        grad_k = apply_rope_backward(grad_k, *rope_args)  # (B, Hkv, N, d)
    grad_x = np.zeros_like(x)  # (B, N, D)
    for name, g, w in (("q", grad_q, w_q), ("k", grad_k, w_k), ("v", grad_v, w_v)):
        g = merge_heads(g)  # (B, N, h*d)
        grads["w_" + name] = x.reshape(B * N, D).T @ g.reshape(B * N, -1)  # (D, B*N) @ (B*N, h*d) -> (D, h*d)
        if {"q": b_q, "k": b_k, "v": b_v}[name] is not None:
            grads["b_" + name] = g.sum(axis=(0, 1))  # (h*d,)
        grad_x = grad_x + g @ w.T  # (B, N, h*d) @ (h*d, D) -> (B, N, D)
    grads["x"] = grad_x
    return grads


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
