"""The Numba backend: ``@njit(parallel=True)`` kernels behind the raw contract of ``kernels/README.md``.

Importing this package imports Numba and loads its CPU registries (as the first call would, but without importing
``scipy.linalg``: ``_config.load_registries``) and compiles nothing: each kernel compiles on its first call for the
types it meets, and the machine code is cached on disk (``cache=True``), so a later process only loads it.
``fastattn.warmup()`` compiles ahead of time for the common dtypes and layouts (through the call layer, as the API
calls).

Each public name is a thin Python function with exactly the contract's signature. It normalises its arguments so
that one compiled variant per dtype serves every caller (``scale`` becomes the arrays' dtype, flags ``bool``,
offsets ``int``; inputs are passed as read-only views; ``mask``/``key_bias`` as a flat view plus strides, which
covers contiguous arrays and broadcast views alike) and picks the fused engine and tile shape of the call's plan
(``_config.plan_for``: per machine, dtype and head width, see fastattn._plans). The ``@njit`` kernels do the work:

    embedding.py         gather, gather_add_positions; gather_backward
    positions.py         add_positions, rope; add_positions_backward (RoPE's backward is rope with -sin)
    attention_stages.py  scores, softmax, weighted_sum          (stage by stage, profilable one at a time)
                         and their backward kernels (softmax_backward, scores_backward, weighted_sum_backward)
    attention_fused.py   attention_tiled (default), attention_blas, attention_loops   (flash style, O(N) memory)
                         attention_decode (L == 1: the keys split across threads, merged by log-sum-exp)
    attention_backward.py  attention_backward                   (flash style, P recomputed from lse)
    _gemm.py             the register-blocked tile product of attention_tiled
    _math.py             vectorisable exp, NaN-ignoring max
    _config.py           fastmath flags, cache folder, threads, SciPy BLAS threads, Numba's registries
"""

from __future__ import annotations

import numpy as np

from . import _config  # first of ours: it settles NUMBA_CACHE_DIR before Numba is imported
from . import attention_backward as _backward
from . import attention_fused as _fused
from . import attention_stages as _stages
from . import embedding as _embedding
from . import positions as _positions
from ._config import FASTMATH, blas_info, get_num_threads, set_num_threads

__all__ = [
    "gather",
    "gather_add_positions",
    "add_positions",
    "rope",
    "scores",
    "softmax",
    "weighted_sum",
    "attention",
    "attention_backward",
    "softmax_backward",
    "scores_backward",
    "weighted_sum_backward",
    "gather_backward",
    "add_positions_backward",
    "get_num_threads",
    "set_num_threads",
    "set_local_threads",
    "configure",
    "blas_info",
    "FASTMATH",
]

#: Decoding (L == 1): with fewer than DECODE_MAX_ROWS (batch, head) rows and more than DECODE_PART keys, the keys are
#: cut into parts of DECODE_PART keys, computed in parallel and merged by log-sum-exp (``attention_decode``). A rule of
#: shapes only, so that the thread count never changes the results.
DECODE_PART = 1024
DECODE_MAX_ROWS = 64

#: Tile sizes of the fused backward (query rows x keys): multiples of the micro-kernel's rows and vector width.
BACKWARD_BLOCK_Q = 96
BACKWARD_BLOCK_K = 128

configure = _config.configure
set_local_threads = _config.set_local_threads

_config.load_registries()  # what the first kernel call would do, minus importing scipy.linalg (0.1-0.25 s)


def _ro(a):
    """A read-only view of ``a``: inputs reach the kernels with one type whether the caller's array is writable or not
    (Numba compiles a separate variant per read-only flag and layout)."""
    view = a.view()
    view.flags.writeable = False
    return view


def _flat(a):
    """``(flat, strides)``: a read-only 1-D view of the memory ``a`` addresses, and ``a``'s strides in elements.

    ``a[idx] == flat[sum(idx * strides)]``. Used for ``mask`` and ``key_bias``, which may be broadcast views (zero
    strides): one compiled variant then serves them and contiguous arrays alike.
    """
    item = a.itemsize
    if a.size == 0 or any(st < 0 or st % item for st in a.strides):  # not from the API: make it plain
        a = np.ascontiguousarray(a)
    if a.size == 0:
        return np.zeros(1, a.dtype)[:0], (0,) * a.ndim
    strides = tuple(st // item for st in a.strides)
    span = 1 + sum((n - 1) * st for n, st in zip(a.shape, strides, strict=True))
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,), writeable=False)
    return flat, strides


def gather(out, ids, table):
    _config.use_num_threads()
    _config.launch(_embedding.gather, out, _ro(ids), _ro(table))


def gather_add_positions(out, ids, table, positions, seq_len, offset):
    _config.use_num_threads()
    _config.launch(
        _embedding.gather_add_positions, out, _ro(ids), _ro(table), _ro(positions), int(seq_len), int(offset)
    )


def add_positions(out, x, positions, offset):
    _config.use_num_threads()
    _config.launch(_positions.add_positions, out, _ro(x), _ro(positions), int(offset))


def rope(out, x, cos, sin, interleaved):
    _config.use_num_threads()
    _config.launch(_positions.rope, out, _ro(x), _ro(cos), _ro(sin), bool(interleaved))


def scores(out, q, k, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
    _config.use_num_threads()
    mask, mst = _flat(mask)
    key_bias, kst = _flat(key_bias)
    _config.launch(_stages.scores, out, _ro(q), _ro(k), out.dtype.type(scale), bool(causal), int(causal_offset),
                   int(window), mask, mst, bool(has_mask), key_bias, kst, bool(has_key_bias))


def softmax(out, s):
    _config.use_num_threads()
    _config.launch(_stages.softmax, out, _ro(s))


def weighted_sum(out, p, v):
    n_threads = _config.use_num_threads()
    _config.launch(_stages.weighted_sum, out, _ro(p), _ro(v), n_threads)


def attention(out, lse, q, k, v, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
    n_threads = _config.use_num_threads()
    mask, mst = _flat(mask)
    key_bias, kst = _flat(key_bias)
    B, Hq, L = q.shape[:3]
    if L == 1 and k.shape[2] > DECODE_PART and B * Hq < DECODE_MAX_ROWS:
        _config.launch(_fused.attention_decode, out, lse, _ro(q), _ro(k), _ro(v), out.dtype.type(scale), bool(causal),
                       int(causal_offset), int(window), mask, mst, bool(has_mask), key_bias, kst, bool(has_key_bias),
                       DECODE_PART, n_threads)
        return
    tiles, block_q, block_k = _config.plan_for(out.dtype, q.shape[3])  # the plan of this dtype and head width
    kernel = _fused_kernel(tiles)
    _config.launch(kernel, out, lse, _ro(q), _ro(k), _ro(v), out.dtype.type(scale), bool(causal), int(causal_offset),
                   int(window), mask, mst, bool(has_mask), key_bias, kst, bool(has_key_bias), block_q, block_k,
                   n_threads)


def attention_backward(grad_q, grad_k, grad_v, grad_out, q, k, v, out, lse, scale, causal, causal_offset, window,
                       mask, has_mask, key_bias, has_key_bias):
    n_threads = _config.use_num_threads()
    mask, mst = _flat(mask)
    key_bias, kst = _flat(key_bias)
    _config.launch(_backward.attention_backward, grad_q, grad_k, grad_v, _ro(grad_out), _ro(q), _ro(k), _ro(v),
                   _ro(out), _ro(lse), out.dtype.type(scale), bool(causal), int(causal_offset), int(window), mask, mst,
                   bool(has_mask), key_bias, kst, bool(has_key_bias), BACKWARD_BLOCK_Q, BACKWARD_BLOCK_K, n_threads)


def softmax_backward(grad_s, grad_p, p):
    _config.use_num_threads()
    _config.launch(_stages.softmax_backward, grad_s, _ro(grad_p), _ro(p))


def scores_backward(grad_q, grad_k, grad_s, q, k, scale):
    n_threads = _config.use_num_threads()
    _config.launch(_stages.scores_backward, grad_q, grad_k, _ro(grad_s), _ro(q), _ro(k), q.dtype.type(scale),
                   n_threads)


def weighted_sum_backward(grad_p, grad_v, grad_out, p, v):
    n_threads = _config.use_num_threads()
    _config.launch(_stages.weighted_sum_backward, grad_p, grad_v, _ro(grad_out), _ro(p), _ro(v), n_threads)


def gather_backward(grad_table, grad_out, ids):
    _config.use_num_threads()
    _config.launch(_embedding.gather_backward, grad_table, _ro(grad_out), _ro(ids))


def add_positions_backward(grad_positions, grad_out, offset):
    _config.use_num_threads()
    _config.launch(_positions.add_positions_backward, grad_positions, _ro(grad_out), int(offset))


def _fused_kernel(tiles):
    """The engine of the tile products of the call's plan: "micro" (default), "blas" (SciPy's BLAS made
    single-threaded once) or "loops"."""
    if tiles == "micro":
        return _fused.attention_tiled
    if tiles == "blas":
        _config.limit_scipy_blas_threads()
        return _fused.attention_blas
    return _fused.attention_loops
