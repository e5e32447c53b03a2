"""The composed forward pass of the founding note: embed -> add positions -> self-attention."""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _backends, _call
from . import _validation as V
from .functional import _self_attention_args, sinusoidal_positions

__all__ = ["Params", "init_params", "forward"]


@dataclasses.dataclass(frozen=True)
class Params:
    """Weights of the one-layer forward pass. Projections are applied as ``x @ w``.

    Attributes
    ----------
    embedding : (V, D) token embedding table.
    positions : (P, D) position table (sinusoidal or learned); sequences may be up to P tokens long.
    w_q : (D, H·d); w_k, w_v : (D, Hkv·d); w_o : (H·d, D) or None.
    n_heads, n_kv_heads : query heads H and key/value heads Hkv (None means H).
    b_q, b_k, b_v, b_o : optional biases.
    """

    embedding: np.ndarray
    positions: np.ndarray
    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray | None
    n_heads: int
    n_kv_heads: int | None = None
    b_q: np.ndarray | None = None
    b_k: np.ndarray | None = None
    b_v: np.ndarray | None = None
    b_o: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def d_model(self) -> int:
        return self.embedding.shape[1]


def init_params(vocab_size, d_model, n_heads, *, max_positions, seed=0, dtype=np.float32) -> Params:
    """Seeded random weights: N(0, 1) embeddings, sinusoidal positions, N(0, 1/D) projections.

    Examples
    --------
    >>> import fastattn
    >>> p = fastattn.init_params(100, 32, 4, max_positions=16)
    >>> p.embedding.shape, p.positions.shape, p.w_q.shape
    ((100, 32), (16, 32), (32, 32))
    """
    vocab_size = V.positive_int("vocab_size", vocab_size)
    d_model = V.positive_int("d_model", d_model)
    n_heads = V.positive_int("n_heads", n_heads)
    max_positions = V.positive_int("max_positions", max_positions)
    dtype = V.float_dtype("dtype", dtype)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    rng = np.random.default_rng(seed)
    std = 1.0 / np.sqrt(d_model)
    w = [(rng.standard_normal((d_model, d_model)) * std).astype(dtype) for _ in range(4)]
    return Params(
        embedding=rng.standard_normal((vocab_size, d_model)).astype(dtype),
        positions=sinusoidal_positions(max_positions, d_model, dtype=dtype),
        w_q=w[0],
        w_k=w[1],
        w_v=w[2],
        w_o=w[3],
        n_heads=n_heads,
    )


def forward(token_ids, params: Params, *, is_causal=False, key_padding_mask=None, backend=None) -> np.ndarray:
    """The forward pass: embedding lookup, positional add (fused in one pass), then multi-head self-attention.

    Parameters
    ----------
    token_ids : array_like of int, shape (B, N) or (N,)
    params : Params
    is_causal : bool
    key_padding_mask : ndarray (B, N), optional
        True = padding token, ignored as a key.

    Returns
    -------
    ndarray, shape (B, N, D) (or (N, D) for 1-D ids)

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> p = fastattn.init_params(50, 16, 2, max_positions=8)
    >>> fastattn.forward(np.array([[1, 2, 3]]), p, is_causal=True).shape
    (1, 3, 16)
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be a fastattn.Params (see fastattn.init_params), got {type(params).__name__}")
    table = V.float_array("params.embedding", params.embedding, ndim=2)
    ids = V.token_ids("token_ids", token_ids, table.shape[0])
    if ids.ndim not in (1, 2):
        raise ValueError(f"token_ids must have shape (B, N) or (N,), got shape {ids.shape}")
    squeeze = ids.ndim == 1
    ids2 = ids[None] if squeeze else ids
    B, N = ids2.shape
    D = table.shape[1]
    positions = V.float_array("params.positions", params.positions, ndim=2)
    V.same_dtype(embedding=table, positions=positions)
    if positions.shape[1] != D:
        raise ValueError(f"params.positions must have {D} columns, got shape {positions.shape}")
    if N > positions.shape[0]:
        raise ValueError(f"token_ids has {N} tokens but params.positions has only {positions.shape[0]} rows")
    p = params
    args = _self_attention_args(  # every check before any work
        (B, N, D), table.dtype, p.w_q, p.w_k, p.w_v, p.w_o, p.n_heads, p.n_kv_heads, p.b_q, p.b_k, p.b_v, p.b_o,
        is_causal, key_padding_mask, None,
    )  # fmt: skip
    kern = _backends.kernels(backend)
    x = _call.gather_add_positions(kern, ids2, table, positions)  # (B, N, D)
    y = _call.self_attention(kern, x, *args)
    return y[0] if squeeze else y
