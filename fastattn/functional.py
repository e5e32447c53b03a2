"""The public functions of the forward pass: validate and normalise here, compute in the backend's kernels."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from . import _backends
from . import _validation as V
from ._cython_compat import lse_scratch  # TEMPORARY until cython-backward merges (then: np.empty)

__all__ = [
    "embed",
    "sinusoidal_positions",
    "add_positions",
    "apply_rope",
    "scaled_dot_product_attention",
    "self_attention",
]


def _contiguous(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _dummy(dtype, shape):
    """A read-only zero-stride stand-in for an absent mask (kernels never read it)."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype=dtype), shape)


# --------------------------------------------------------------------------------------------------------------
# 1. Embedding lookup
# --------------------------------------------------------------------------------------------------------------
def embed(token_ids, table, *, backend=None) -> np.ndarray:
    """Look up the rows of ``table`` for integer ``token_ids`` (the one-hot product, done as a row gather).

    Parameters
    ----------
    token_ids : array_like of int, shape (...)
        Ids in ``[0, V)``; negative ids are an error, not wrapped around.
    table : ndarray, shape (V, D), float32 or float64
    backend : str, optional
        ``"numba"``, ``"cython"`` or ``"numpy"`` (the oracle); default: see ``use_backend``.

    Returns
    -------
    ndarray, shape (..., D), dtype of ``table``

    Raises
    ------
    IndexError
        An id is negative or ``>= V``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> table = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> fastattn.embed([[2, 0]], table).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    table = V.float_array("table", table, ndim=2)
    ids = V.token_ids("token_ids", token_ids, table.shape[0])
    kern = _backends.kernels(backend)
    out = np.empty((ids.size, table.shape[1]), dtype=table.dtype)
    if out.size:
        kern.gather(out, _contiguous(ids.reshape(-1)), _contiguous(table))
    return out.reshape(ids.shape + (table.shape[1],))


# --------------------------------------------------------------------------------------------------------------
# 2. Positional encoding
# --------------------------------------------------------------------------------------------------------------
def sinusoidal_positions(n_positions, d_model, *, base=10000.0, dtype=np.float32) -> np.ndarray:
    """The sinusoidal table of "Attention Is All You Need": PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(...).

    An odd ``d_model`` works (the last column is a sine). Computed in float64, returned in ``dtype``.

    Examples
    --------
    >>> import fastattn
    >>> pe = fastattn.sinusoidal_positions(4, 6)
    >>> pe.shape, pe.dtype.name, float(pe[0, 1])
    ((4, 6), 'float32', 1.0)
    """
    n_positions = V.positive_int("n_positions", n_positions, allow_zero=True)
    d_model = V.positive_int("d_model", d_model)
    base = V.real_number("base", base, positive=True)
    dtype = V.float_dtype("dtype", dtype)
    i = np.arange(d_model) // 2  # (D,) pair index of each column
    angle = np.arange(n_positions)[:, None] / base ** (2 * i / d_model)  # (P, D)
    pe = np.where(np.arange(d_model) % 2 == 0, np.sin(angle), np.cos(angle))  # (P, D)
    return pe.astype(dtype)


def _positions_for(x: np.ndarray, positions, offset) -> tuple[np.ndarray, int]:
    positions = V.float_array("positions", positions, ndim=2)
    V.same_dtype(x=x, positions=positions)
    offset = V.positive_int("offset", offset, allow_zero=True)
    n, d = x.shape[-2], x.shape[-1]
    if positions.shape[1] != d:
        raise ValueError(f"positions must have {d} columns to match x (..., N, {d}), got shape {positions.shape}")
    if offset + n > positions.shape[0]:
        raise ValueError(
            f"positions has {positions.shape[0]} rows but offset + N = {offset} + {n} = {offset + n} are needed"
        )
    return positions, offset


def add_positions(x, positions, *, offset=0, backend=None) -> np.ndarray:
    """Add position vectors to the rows of ``x``: ``x[..., n, :] + positions[offset + n]``.

    Parameters
    ----------
    x : ndarray, shape (..., N, D)
    positions : ndarray, shape (P, D)
        A sinusoidal table or learned positions, with ``offset + N <= P``.
    offset : int
        Position of the first row (for a continued sequence).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.zeros((1, 2, 4), dtype=np.float32)
    >>> pe = fastattn.sinusoidal_positions(8, 4)
    >>> np.allclose(fastattn.add_positions(x, pe, offset=3)[0], pe[3:5])
    True
    """
    x = V.float_array("x", x, min_ndim=2)
    positions, offset = _positions_for(x, positions, offset)
    kern = _backends.kernels(backend)
    out = np.empty(x.shape, dtype=x.dtype)
    if out.size:
        n, d = x.shape[-2], x.shape[-1]
        kern.add_positions(out.reshape(-1, n, d), _contiguous(x).reshape(-1, n, d), _contiguous(positions), offset)
    return out


def _rope_tables(n: int, d: int, offset: int, base: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)  # (d/2,)
    theta = np.outer(np.arange(offset, offset + n, dtype=np.float64), inv_freq)  # (N, d/2)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def _rope(kern, x: np.ndarray, offset: int, base: float, interleaved: bool) -> np.ndarray:
    """RoPE over the last two axes of a validated x (..., N, d) on the given kernels."""
    out = np.empty(x.shape, dtype=x.dtype)
    if out.size:
        n, d = x.shape[-2], x.shape[-1]
        cos, sin = _rope_tables(n, d, offset, base, x.dtype)
        kern.rope(out.reshape(-1, n, d), _contiguous(x).reshape(-1, n, d), cos, sin, interleaved)
    return out


def apply_rope(x, *, offset=0, base=10000.0, interleaved=False, backend=None) -> np.ndarray:
    """Rotary position embedding (RoPE) on ``x`` (..., N, d), d even.

    Feature pairs are rotated by the angle ``(offset + n) / base^(2i/d)``. ``interleaved=False`` (default) pairs
    feature i with i + d/2, the GPT-NeoX / Hugging Face Llama layout; ``interleaved=True`` pairs 2i with 2i + 1,
    the original Llama / GPT-J layout. Norms are kept, and ⟨rope(q, m), rope(k, n)⟩ depends only on m − n.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.ones((3, 4), dtype=np.float32)
    >>> y = fastattn.apply_rope(x)
    >>> np.allclose(np.linalg.norm(y, axis=-1), 2.0), np.allclose(y[0], x[0])
    (True, True)
    """
    x = V.float_array("x", x, min_ndim=2)
    offset = V.positive_int("offset", offset, allow_zero=True)
    base = V.real_number("base", base, positive=True)
    interleaved = V.flag("interleaved", interleaved)
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope needs an even last dimension d, got shape {x.shape}")
    return _rope(_backends.kernels(backend), x, offset, base, interleaved)


# --------------------------------------------------------------------------------------------------------------
# 3. Attention
# --------------------------------------------------------------------------------------------------------------
def _reshape_no_copy(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``a`` reshaped as a view (strides allowing), else None."""
    try:
        return np.reshape(a, shape, copy=False)
    except ValueError:  # it would need a copy
        return None
    except TypeError:  # NumPy < 2.1: no copy= argument
        view = a.view()
        try:
            view.shape = shape
        except AttributeError:
            return None
        return view


def _mask_4d(m: np.ndarray, batch: tuple[int, ...], heads: int, L: int, S: int) -> np.ndarray:
    """A mask that broadcasts to ``batch + (heads, L, S)`` as a (B, heads, L, S) view with zero strides where it
    broadcasts. The mask's own (heads, L, S) extents are never expanded; at worst its batch part is copied out."""
    nb = len(batch)
    m = m.reshape((1,) * (nb + 3 - m.ndim) + m.shape)  # (b..., h or 1, L or 1, S or 1)
    own = m.shape[nb:]
    flat = _reshape_no_copy(m, (math.prod(m.shape[:nb]),) + own)
    if flat is None or m.shape[:nb] not in (batch, (1,) * nb):  # batch dims that neither match nor are all 1
        flat = np.ascontiguousarray(np.broadcast_to(m, batch + own)).reshape((math.prod(batch),) + own)
    return np.broadcast_to(flat, (math.prod(batch), heads, L, S))


def _run_attention(kern, q, k, v, scale, causal, causal_offset, mask, key_bias, window=0, want_lse=False):
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) contiguous; mask None or (B, Hq, L, S) view;
    key_bias None or (B, S) view. Returns out (B, Hq, L, Ev), and lse (B, Hq, L) too when ``want_lse``."""
    B, Hq, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = np.zeros((B, Hq, L, Ev), dtype=q.dtype)
    if out.size == 0 or S == 0:  # nothing to compute, or no key at all: every row attends to nothing -> zeros
        return (out, np.full((B, Hq, L), -np.inf, q.dtype)) if want_lse else out
    has_mask, has_bias = mask is not None, key_bias is not None
    mask = mask if has_mask else _dummy(q.dtype, (B, Hq, L, S))
    key_bias = key_bias if has_bias else _dummy(q.dtype, (B, S))
    lse = np.empty((B, Hq, L), q.dtype) if want_lse else lse_scratch(kern, (B, Hq, L), q.dtype)
    kern.attention(out, lse, q, k, v, float(scale), bool(causal), int(causal_offset), int(window), mask, has_mask,
                   key_bias, has_bias)  # fmt: skip
    return (out, lse) if want_lse else out


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    window=None,
    return_lse=False,
    backend=None,
):
    """softmax(Q Kᵀ · scale + mask) V, with the signature and semantics of PyTorch's function, on NumPy arrays.

    Parameters
    ----------
    query : ndarray, shape (..., L, E)
    key : ndarray, shape (..., S, E)
    value : ndarray, shape (..., S, Ev)
        Leading dimensions broadcast. float32 or float64, all the same dtype.
    attn_mask : ndarray, optional
        Broadcasts to (..., L, S). Boolean: True = takes part. Float: added to the scores.
    dropout_p : float
        Must be 0 (inference only).
    is_causal : bool
        Query i sees keys j <= i (the lower triangle of ones(L, S), aligned top-left). Not with ``attn_mask``.
    scale : float, optional
        Default ``1 / sqrt(E)``.
    enable_gqa : bool
        Grouped-query attention: key/value heads Hkv divide query heads Hq; each serves Hq/Hkv consecutive heads.
    window : int, optional
        Sliding window (with ``is_causal`` only): query i sees keys j with ``i - window < j <= i``.
    return_lse : bool
        Also return the log-sum-exp of each row's scaled, masked scores, the one number per row that
        ``scaled_dot_product_attention_backward`` needs besides the output.

    Returns
    -------
    ndarray, shape (..., L, Ev), dtype of the inputs. A row with no key to attend to is zeros, never NaN.
    With ``return_lse=True``: ``(out, lse)``, lse of shape (..., L) (``-inf`` for a row with no key to attend to).

    Notes
    -----
    Non-finite input: a NaN or ±inf anywhere in query row i makes output row i NaN and leaves every other row
    bitwise unchanged. A NaN in a key, a value or a float mask entry reaches the rows that attend to it; rows for
    which it is masked out may stay finite or be NaN depending on the backend (the oracle multiplies a zero weight
    by NaN). Float masks may hold ``-inf``; a row whose every score is ``-inf`` gives zeros. With ``E = 0`` every
    score is 0, so each row averages the values it may see (as PyTorch does).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 5, 8), dtype=np.float32) for _ in range(3))
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape, np.allclose(out[..., 0, :], v[..., 0, :])
    ((2, 4, 5, 8), True)
    """
    q = V.float_array("query", query, min_ndim=2)
    k = V.float_array("key", key, min_ndim=2)
    v = V.float_array("value", value, min_ndim=2)
    dtype = V.same_dtype(query=q, key=k, value=v)
    is_causal, enable_gqa = V.flag("is_causal", is_causal), V.flag("enable_gqa", enable_gqa)
    if V.real_number("dropout_p", dropout_p) != 0.0:
        raise ValueError(f"dropout_p must be 0.0: fastattn is inference only, got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal=True cannot be combined with attn_mask: pass one or the other")
    window = check_window(window, is_causal)
    return_lse = V.flag("return_lse", return_lse)
    L, E = q.shape[-2:]
    S = k.shape[-2]
    if k.shape[-1] != E:
        raise ValueError(f"query and key must share the last dimension E, got query {q.shape} and key {k.shape}")
    if v.shape[-2] != S:
        raise ValueError(f"key and value must share the sequence dimension S, got key {k.shape} and value {v.shape}")
    if scale is None:  # E = 0: every score is an empty sum, 0, whatever the scale (PyTorch: uniform weights)
        scale = 1.0 / math.sqrt(E) if E else 1.0
    else:
        scale = V.real_number("scale", scale)
    Ev = v.shape[-1]

    # Leading dims: batch (...) and heads; a key/value head dim of 1, or Hkv dividing Hq with GQA, is not copied.
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

    def norm(a, full, h):  # broadcast the batch dims, keep the own head count, flatten to 4-D
        return _contiguous(np.broadcast_to(a.reshape(full), batch + (h,) + full[-2:])).reshape(B, h, *full[-2:])

    q4 = norm(q, qs, Hq)
    k4 = norm(k, ks, Hkv)
    v4 = norm(v, vs, Hkv)
    mask = None
    if attn_mask is not None:
        m = V.mask_array("attn_mask", attn_mask, dtype, lead + (L, S))
        mask = _mask_4d(m, batch, Hq, L, S)
    kern = _backends.kernels(backend)
    if not return_lse:
        return _run_attention(kern, q4, k4, v4, scale, is_causal, 0, mask, None, window).reshape(lead + (L, Ev))
    out, lse = _run_attention(kern, q4, k4, v4, scale, is_causal, 0, mask, None, window, want_lse=True)
    return out.reshape(lead + (L, Ev)), lse.reshape(lead + (L,))


def check_window(window, is_causal) -> int:
    """``window`` of scaled_dot_product_attention as the kernels' int (0: none)."""
    if window is None:
        return 0
    window = V.positive_int("window", window)
    if not is_causal:
        raise ValueError(f"window={window} needs is_causal=True (a sliding window over the causal lower triangle)")
    return window


def _rope_settings(rope) -> tuple[int, float, bool] | None:
    if rope is None or rope is False:
        return None
    if rope is True:
        return 0, 10000.0, False
    if not isinstance(rope, Mapping):
        raise TypeError(
            "rope must be None, True or a mapping such as {'base': 10000.0, 'interleaved': False, 'offset': 0}, "
            f"got {type(rope).__name__}"
        )
    unknown = set(rope) - {"base", "interleaved", "offset"}
    if unknown:
        raise ValueError(f"rope has unknown keys {sorted(unknown)}; allowed: base, interleaved, offset")
    return (
        V.positive_int("rope['offset']", rope.get("offset", 0), allow_zero=True),
        V.real_number("rope['base']", rope.get("base", 10000.0), positive=True),
        V.flag("rope['interleaved']", rope.get("interleaved", False)),
    )


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
    backend=None,
) -> np.ndarray:
    """Multi-head self-attention: Q = X W_q, K = X W_k, V = X W_v, split into heads, attend, merge, project.

    Weights are applied as ``x @ w`` (the founding note's X·W_q); PyTorch ``Linear`` weights are the transpose.

    Parameters
    ----------
    x : ndarray, shape (B, N, D) or (N, D)
    w_q : ndarray, shape (D, n_heads·d)
    w_k, w_v : ndarray, shape (D, n_kv_heads·d) and (D, n_kv_heads·dv)
    w_o : ndarray, shape (n_heads·dv, D_out), optional
    n_heads, n_kv_heads : int
        Query heads, and key/value heads (default ``n_heads``; fewer is grouped-query attention).
    b_q, b_k, b_v, b_o : ndarray, optional
        Biases added after each projection.
    is_causal : bool
        Token i attends to tokens 0..i only.
    key_padding_mask : ndarray, shape (B, N), optional
        Boolean True = padding, ignored as a key (PyTorch ``MultiheadAttention`` convention), or a float mask
        added to the scores of each key.
    rope : None, True or mapping, optional
        Rotary embedding on queries and keys: ``True`` for the defaults or ``{"base", "interleaved", "offset"}``.

    Returns
    -------
    ndarray, shape (B, N, D_out) (or (N, D_out) for 2-D x); without ``w_o``, (.., N, n_heads·dv).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 16), dtype=np.float32)
    >>> w = [rng.standard_normal((16, 16), dtype=np.float32) / 4 for _ in range(4)]
    >>> fastattn.self_attention(x, *w, n_heads=4, is_causal=True).shape
    (2, 5, 16)
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
    b_o = None if b_o is None else V.bias("b_o", b_o, dtype, n_heads * dv if w_o is None else w_o.shape[1])
    is_causal = V.flag("is_causal", is_causal)
    rope = _rope_settings(rope)
    if rope is not None and d % 2:
        raise ValueError(f"rope needs an even head dimension, got d = {d}")
    key_bias = None
    if key_padding_mask is not None:
        kb = V.key_padding("key_padding_mask", key_padding_mask, dtype, B, N)
        key_bias = np.broadcast_to(kb, (B, N))
    kern = _backends.kernels(backend)
    return _attend_projected(
        kern, x3, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, n_heads, n_kv_heads, is_causal, key_bias, rope, squeeze
    )


def _project_heads(x3, w, b, h):
    """(B, N, D) @ (D, h·d) (+ b) -> (B, h, N, d), contiguous for the kernels."""
    y = x3 @ w
    if b is not None:
        y += b
    B, N, hd = y.shape
    return _contiguous(y.reshape(B, N, h, hd // h).transpose(0, 2, 1, 3))


def _attend_projected(
    kern, x3, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, n_heads, n_kv_heads, is_causal, key_bias, rope, squeeze
):
    B, N, _ = x3.shape
    q = _project_heads(x3, w_q, b_q, n_heads)  # (B, H, N, d)
    k = _project_heads(x3, w_k, b_k, n_kv_heads)  # (B, Hkv, N, d)
    v = _project_heads(x3, w_v, b_v, n_kv_heads)  # (B, Hkv, N, dv)
    if rope is not None:
        offset, base, interleaved = rope
        q = _rope(kern, q, offset, base, interleaved)
        k = _rope(kern, k, offset, base, interleaved)
    scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    o = _run_attention(kern, q, k, v, scale, is_causal, 0, None, key_bias)  # (B, H, N, dv)
    o = o.transpose(0, 2, 1, 3).reshape(B, N, o.shape[1] * o.shape[3])  # merge heads: (B, N, H·dv)
    if w_o is not None:
        o = o @ w_o
    if b_o is not None:
        o += b_o
    return o[0] if squeeze else o
