"""The public functions of the backward pass: gradients of each forward stage, validated here, computed in the
backend's backward kernels (CONTRACT.md), each held against its literal oracle in ``fastattn.oracle``.

Each function takes ``grad_out``, the gradient of a scalar loss with respect to the forward function's output, and
returns the gradients of that loss with respect to the forward function's inputs (the vector-Jacobian product),
each of its input's shape and dtype. Inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backends
from . import _validation as V
from .functional import _dummy, _mask_4d, _rope_settings, _rope_tables, check_window

__all__ = [
    "scaled_dot_product_attention_backward",
    "embed_backward",
    "add_positions_backward",
    "apply_rope_backward",
    "self_attention_backward",
]


def _kernels(backend):
    """The backend's kernel module, which must have the backward kernels."""
    kern = _backends.kernels(backend)
    missing = [k for k in _backends.BACKWARD_KERNELS if not hasattr(kern, k)]
    if missing:
        name = _backends.resolve_name(backend)
        have = [b for b in _backends.available_backends() if all(hasattr(_backends.kernels(b), k) for k in missing)]
        raise ValueError(
            f"backend {name!r} has no backward kernels in this build (missing {', '.join(missing)}); "
            f"backends with them here: {', '.join(repr(b) for b in have)}"
        )
    return kern


def _grad_like(name: str, g, like: np.ndarray, what: str) -> np.ndarray:
    """``g`` checked to be a float array of ``like``'s dtype and shape (``what`` names ``like`` in the message)."""
    g = V.float_array(name, g)
    if g.dtype != like.dtype:
        raise TypeError(f"{name}.dtype={g.dtype} differs from {what}.dtype={like.dtype}; cast them to one dtype")
    if g.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {what}, {like.shape}, got shape {g.shape}")
    return g


def _sum_to(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``grad`` (of the broadcast shape) summed back to an input of ``shape`` (the axes it was broadcast along)."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=ones, keepdims=True) if ones else grad


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------
def scaled_dot_product_attention_backward(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    window=None,
    backend=None,
):
    """Gradients of ``sum(grad_out * scaled_dot_product_attention(query, key, value, ...))``.

    Flash-style: the forward saves only ``out`` and ``lse`` (``scaled_dot_product_attention(...,
    return_lse=True)``); the backward recomputes the probabilities from ``lse`` a tile at a time, so its memory
    grows with L + S, not L x S, on the compiled backends.

    Parameters
    ----------
    grad_out : ndarray, shape (..., L, Ev)
        Gradient of the loss with respect to the output.
    query, key, value, attn_mask, is_causal, scale, enable_gqa, window
        As given to ``scaled_dot_product_attention``. ``attn_mask`` gets no gradient (it is a constant here).
    out : ndarray, shape (..., L, Ev)
    lse : ndarray, shape (..., L)
        The forward's output and log-sum-exp, from the same arguments.

    Returns
    -------
    (grad_query, grad_key, grad_value), each of its input's shape and dtype. An input broadcast in the forward
    gets its gradient summed back over the broadcast axes (as autograd does); with GQA each key/value head's
    gradient is the sum over the query heads that read it. A row with no key to attend to contributes zero.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    >>> gq, gk, gv = fastattn.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse,
    ...                                                             is_causal=True)
    >>> gq.shape, bool(np.allclose(gv.sum(axis=-2), 5.0))
    ((1, 2, 5, 8), True)
    """
    q = V.float_array("query", query, min_ndim=2)
    k = V.float_array("key", key, min_ndim=2)
    v = V.float_array("value", value, min_ndim=2)
    dtype = V.same_dtype(query=q, key=k, value=v)
    lay = _attention_layout(q, k, v, attn_mask, is_causal, scale, enable_gqa, window, dtype)
    B, Hq, Hkv, L, S, E, Ev = lay["dims"]
    lead = lay["lead"]
    like = np.broadcast_to(np.zeros((), dtype), lead + (L, Ev))
    grad_out = _grad_like("grad_out", grad_out, like, "the attention output")
    out = _grad_like("out", out, like, "the attention output")
    lse = _grad_like("lse", lse, np.broadcast_to(np.zeros((), dtype), lead + (L,)), "the output without its last axis")
    kern = _kernels(backend)
    gq = np.zeros((B, Hq, L, E), dtype)
    gk = np.zeros((B, Hkv, S, E), dtype)
    gv = np.zeros((B, Hkv, S, Ev), dtype)
    if B * Hq * L * S:
        mask = lay["mask"]
        has_mask = mask is not None
        mask = mask if has_mask else _dummy(dtype, (B, Hq, L, S))
        kern.attention_backward(
            gq, gk, gv,
            np.ascontiguousarray(grad_out).reshape(B, Hq, L, Ev), lay["q4"], lay["k4"], lay["v4"],
            np.ascontiguousarray(out).reshape(B, Hq, L, Ev), np.ascontiguousarray(lse).reshape(B, Hq, L),
            float(lay["scale"]), bool(lay["causal"]), 0, int(lay["window"]),
            mask, has_mask, _dummy(dtype, (B, S)), False,
        )  # fmt: skip
    grads = []
    for g, shape, full, h in ((gq, q.shape, lay["qs"], Hq), (gk, k.shape, lay["ks"], Hkv),
                              (gv, v.shape, lay["vs"], Hkv)):  # fmt: skip
        g = g.reshape(lay["batch"] + ((h,) if lay["heads"] else ()) + full[-2:])  # the broadcast shape
        grads.append(np.ascontiguousarray(_sum_to(g, full).reshape(shape)))
    return tuple(grads)


def _attention_layout(q, k, v, attn_mask, is_causal, scale, enable_gqa, window, dtype) -> dict:
    """The forward's normalisation of scaled_dot_product_attention's arguments (same checks and messages):
    the 4-D contiguous q4 (B, Hq, L, E), k4, v4 (B, Hkv, S, .), the 4-D mask view, and the shapes."""
    is_causal, enable_gqa = V.flag("is_causal", is_causal), V.flag("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal=True cannot be combined with attn_mask: pass one or the other")
    window = check_window(window, is_causal)
    L, E = q.shape[-2:]
    S = k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must share the last dimension E, got query {q.shape} and key {k.shape}")
    if v.shape[-2] != S:
        raise ValueError(f"key and value must share the sequence dimension S, got key {k.shape} and value {v.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    else:
        scale = V.real_number("scale", scale)
    Ev = v.shape[-1]
    nd = max(q.ndim, k.ndim, v.ndim)
    qs, ks, vs = ((1,) * (nd - a.ndim) + a.shape for a in (q, k, v))
    if nd >= 3:
        Hq, Hk, Hv = qs[-3], ks[-3], vs[-3]
        if Hk != Hv:
            raise ValueError(f"key and value must have the same number of heads, got key {k.shape} and value {v.shape}")
        if Hq == 1 and Hk != 1 and not enable_gqa:
            Hq = Hk  # a single query head broadcasts over the key/value heads
        if enable_gqa:
            if Hk == 0 or Hq % Hk:
                raise ValueError(
                    f"enable_gqa needs the query heads ({Hq}) to be a multiple of the key/value heads ({Hk})"
                )
        elif Hk not in (1, Hq):
            raise ValueError(
                f"query has {Hq} heads but key/value have {Hk}: heads must match (or be 1) unless enable_gqa=True"
            )
        Hkv = Hk
        batch = V.broadcast("query, key and value", qs[:-3], ks[:-3], vs[:-3])
    else:
        Hq = Hkv = 1
        batch = ()
    B = math.prod(batch)
    lead = batch + ((Hq,) if nd >= 3 else ())

    def norm(a, full, h):
        return np.ascontiguousarray(np.broadcast_to(a.reshape(full), batch + (h,) + full[-2:])).reshape(
            B, h, *full[-2:]
        )

    mask = None
    if attn_mask is not None:
        m = V.mask_array("attn_mask", attn_mask, dtype, lead + (L, S))
        mask = _mask_4d(m, batch, Hq, L, S)
    return dict(
        q4=norm(q, qs, Hq), k4=norm(k, ks, Hkv), v4=norm(v, vs, Hkv), mask=mask, scale=scale, causal=is_causal,
        window=window, dims=(B, Hq, Hkv, L, S, E, Ev), lead=lead, batch=batch, heads=nd >= 3, qs=qs, ks=ks, vs=vs,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Embedding and positions
# --------------------------------------------------------------------------------------------------------------
def embed_backward(grad_out, token_ids, vocab_size, *, backend=None) -> np.ndarray:
    """Gradient of ``embed(token_ids, table)`` with respect to ``table``: each id's rows of ``grad_out`` summed.

    The transposed one-hot product (a scatter-add). Ids that repeat are summed in increasing position, so the result
    is bitwise the same for any thread count.

    Parameters
    ----------
    grad_out : ndarray, shape (..., D), the shape of ``token_ids`` plus D
    token_ids : array_like of int, shape (...), each in ``[0, vocab_size)``
    vocab_size : int

    Returns
    -------
    ndarray, shape (vocab_size, D), dtype of ``grad_out`` (rows of ids that do not occur are 0)

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.embed_backward(np.ones((1, 3, 2), np.float32), [[2, 0, 2]], 4).tolist()
    [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    """
    vocab_size = V.positive_int("vocab_size", vocab_size, allow_zero=True)
    ids = V.token_ids("token_ids", token_ids, vocab_size)
    grad_out = V.float_array("grad_out", grad_out, min_ndim=1)
    if grad_out.shape[:-1] != ids.shape:
        raise ValueError(
            f"grad_out must have the shape of token_ids plus one axis, {ids.shape} + (D,), got shape {grad_out.shape}"
        )
    kern = _kernels(backend)
    D = grad_out.shape[-1]
    grad = np.zeros((vocab_size, D), grad_out.dtype)
    if ids.size and grad.size:
        kern.gather_backward(grad, np.ascontiguousarray(grad_out).reshape(-1, D), np.ascontiguousarray(ids.ravel()))
    return grad


def add_positions_backward(grad_out, n_positions, *, offset=0, backend=None) -> np.ndarray:
    """Gradient of ``add_positions(x, positions, offset=offset)`` with respect to ``positions`` (P, D).

    Rows ``offset .. offset + N - 1`` get ``grad_out`` summed over its leading axes (in increasing order), every
    other row is 0. The gradient with respect to ``x`` is ``grad_out`` itself (nothing to compute).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.add_positions_backward(np.ones((2, 1, 3)), 3, offset=1)[:, 0].tolist()
    [0.0, 2.0, 0.0]
    """
    grad_out = V.float_array("grad_out", grad_out, min_ndim=2)
    n_positions = V.positive_int("n_positions", n_positions, allow_zero=True)
    offset = V.positive_int("offset", offset, allow_zero=True)
    n, d = grad_out.shape[-2:]
    if offset + n > n_positions:
        raise ValueError(f"n_positions={n_positions} rows cannot hold offset + N = {offset} + {n} = {offset + n}")
    kern = _kernels(backend)
    grad = np.zeros((n_positions, d), grad_out.dtype)
    if grad_out.size:
        kern.add_positions_backward(grad, np.ascontiguousarray(grad_out).reshape(-1, n, d), offset)
    return grad


def apply_rope_backward(grad_out, *, offset=0, base=10000.0, interleaved=False, backend=None) -> np.ndarray:
    """Gradient of ``apply_rope(x, ...)`` with respect to ``x``: the inverse rotation (by minus each angle).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.arange(8.0).reshape(2, 4)
    >>> bool(np.allclose(fastattn.apply_rope_backward(fastattn.apply_rope(x, offset=3), offset=3), x))
    True
    """
    g = V.float_array("grad_out", grad_out, min_ndim=2)
    offset = V.positive_int("offset", offset, allow_zero=True)
    base = V.real_number("base", base, positive=True)
    interleaved = V.flag("interleaved", interleaved)
    if g.shape[-1] % 2:
        raise ValueError(f"apply_rope_backward needs an even last dimension d, got shape {g.shape}")
    return _rope_backward(_backends.kernels(backend), g, offset, base, interleaved)


def _rope_backward(kern, g: np.ndarray, offset: int, base: float, interleaved: bool) -> np.ndarray:
    out = np.empty(g.shape, g.dtype)
    if out.size:
        n, d = g.shape[-2:]
        cos, sin = _rope_tables(n, d, offset, base, g.dtype)
        kern.rope(out.reshape(-1, n, d), np.ascontiguousarray(g).reshape(-1, n, d), cos, -sin, interleaved)
    return out


# --------------------------------------------------------------------------------------------------------------
# Self-attention
# --------------------------------------------------------------------------------------------------------------
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
    backend=None,
) -> dict:
    """Gradients of ``sum(grad_out * self_attention(x, w_q, ...))`` with the same arguments.

    The forward is recomputed (keeping the projected heads, the attention output and its log-sum-exp), then undone
    step by step: output projection, heads, the fused attention backward, RoPE, the three projections.

    Returns
    -------
    dict: ``"x"`` and each weight and bias that was given (``"w_q"``, ``"w_k"``, ``"w_v"``, ``"w_o"``, ``"b_q"``,
    ...), each of its argument's shape and dtype. ``key_padding_mask`` gets no gradient.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 8))
    >>> w = [rng.standard_normal((8, 8)) / 3 for _ in range(3)]
    >>> g = fastattn.self_attention_backward(np.ones((2, 5, 8)), x, *w, n_heads=2, is_causal=True)
    >>> sorted(g), g["w_q"].shape
    (['w_k', 'w_q', 'w_v', 'x'], (8, 8))
    """
    x = V.float_array("x", x)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (B, N, D) or (N, D), got shape {x.shape}")
    squeeze = x.ndim == 2
    x3 = x[None] if squeeze else x
    B, N, D = x3.shape
    dtype = x.dtype
    n_heads = V.positive_int("n_heads", n_heads)
    n_kv_heads = n_heads if n_kv_heads is None else V.positive_int("n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    w_q = V.weight("w_q", w_q, dtype, D)
    if w_q.shape[1] % n_heads:
        raise ValueError(f"w_q's {w_q.shape[1]} columns do not split into n_heads={n_heads} heads")
    d = w_q.shape[1] // n_heads
    w_k = V.weight("w_k", w_k, dtype, D, cols=n_kv_heads * d)
    w_v = V.weight("w_v", w_v, dtype, D)
    if w_v.shape[1] % n_kv_heads:
        raise ValueError(f"w_v's {w_v.shape[1]} columns do not split into n_kv_heads={n_kv_heads} heads")
    dv = w_v.shape[1] // n_kv_heads
    w_o = None if w_o is None else V.weight("w_o", w_o, dtype, n_heads * dv)
    b_q = V.bias("b_q", b_q, dtype, n_heads * d)
    b_k = V.bias("b_k", b_k, dtype, n_kv_heads * d)
    b_v = V.bias("b_v", b_v, dtype, n_kv_heads * dv)
    d_out = n_heads * dv if w_o is None else w_o.shape[1]
    b_o = None if b_o is None else V.bias("b_o", b_o, dtype, d_out)
    is_causal = V.flag("is_causal", is_causal)
    rope = _rope_settings(rope)
    if rope is not None and d % 2:
        raise ValueError(f"rope needs an even head dimension, got d = {d}")
    key_bias = None
    if key_padding_mask is not None:
        kb = V.key_padding("key_padding_mask", key_padding_mask, dtype, B, N)
        key_bias = np.broadcast_to(kb, (B, N))
    g = _grad_like("grad_out", grad_out, np.broadcast_to(np.zeros((), dtype), x.shape[:-1] + (d_out,)), "the output")
    g3 = g[None] if squeeze else g
    kern = _kernels(backend)

    def heads(y, h):  # (B, N, h·e) -> (B, h, N, e)
        return np.ascontiguousarray(y.reshape(B, N, h, -1).transpose(0, 2, 1, 3))

    def merge(y):  # (B, h, N, e) -> (B, N, h·e)
        return y.transpose(0, 2, 1, 3).reshape(B, N, -1)

    # forward, keeping the heads, the attention output and its log-sum-exp
    projected = []
    for w, b, h in ((w_q, b_q, n_heads), (w_k, b_k, n_kv_heads), (w_v, b_v, n_kv_heads)):
        y = x3 @ w
        if b is not None:
            y += b
        projected.append(heads(y, h))
    q, k, v = projected
    if rope is not None:
        from .functional import _rope

        q, k = (_rope(kern, t, *rope) for t in (q, k))
    scale = 1.0 / math.sqrt(d) if d else 1.0
    S = N
    has_bias = key_bias is not None
    bias = key_bias if has_bias else _dummy(dtype, (B, S))
    no_mask = _dummy(dtype, (B, n_heads, N, S))
    o = np.zeros((B, n_heads, N, dv), dtype)
    lse = np.full((B, n_heads, N), -np.inf, dtype)
    gq, gk, gv = np.zeros(q.shape, dtype), np.zeros(k.shape, dtype), np.zeros(v.shape, dtype)
    grads = {}
    if b_o is not None:
        grads["b_o"] = g3.sum(axis=(0, 1))
    grad_om = g3
    om = None
    if B * N:
        kern.attention(o, lse, q, k, v, scale, is_causal, 0, 0, no_mask, False, bias, has_bias)
    om = merge(o)  # (B, N, H·dv)
    if w_o is not None:
        grads["w_o"] = om.reshape(B * N, -1).T @ g3.reshape(B * N, -1)
        grad_om = g3 @ w_o.T
    grad_o = heads(grad_om, n_heads)  # (B, H, N, dv)
    if B * N:
        kern.attention_backward(gq, gk, gv, grad_o, q, k, v, o, lse, scale, is_causal, 0, 0, no_mask, False, bias,
                                has_bias)  # fmt: skip
    if rope is not None:
        gq, gk = (_rope_backward(kern, t, *rope) for t in (gq, gk))
    grad_x = np.zeros((B, N, D), dtype)
    for name, gh, w, b in (("q", gq, w_q, b_q), ("k", gk, w_k, b_k), ("v", gv, w_v, b_v)):
        gm = merge(gh)  # (B, N, h·e)
        grads["w_" + name] = x3.reshape(B * N, D).T @ gm.reshape(B * N, -1)
        if b is not None:
            grads["b_" + name] = gm.sum(axis=(0, 1))
        grad_x += gm @ w.T
    grads["x"] = grad_x[0] if squeeze else grad_x
    order = ["x", "w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"]
    return {name: np.ascontiguousarray(grads[name]) for name in order if name in grads}
