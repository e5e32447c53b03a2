"""What the encoder and the decoder share: input checks, activation choice, masks as key biases, the attention call.

The models call the backends' raw kernels directly (the attention kernel of kernels/README.md and the block kernels
of ``fastattn._numpy_blocks``), on arrays they allocated themselves: C-contiguous, one dtype.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from .. import _backends
from .. import _validation as V
from .._cython_compat import lse_scratch  # TEMPORARY until cython-backward merges (then: np.empty)
from ._checkpoint import CheckpointError

#: config.json activation names -> the block kernel that applies it after the bias add.
ACTIVATIONS = {
    "gelu": "bias_gelu",  # exact, with erf (BERT)
    "gelu_python": "bias_gelu",
    "gelu_new": "bias_gelu_tanh",  # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": "bias_gelu_tanh",
    "gelu_fast": "bias_gelu_tanh",
    "gelu_accurate": None,  # a different constant: not supported
}


def activation_kernel(name, config_key: str) -> str:
    kernel = ACTIVATIONS.get(name)
    if kernel is None:
        supported = sorted(k for k, v in ACTIVATIONS.items() if v is not None)
        raise CheckpointError(f"config.json: {config_key}={name!r} is not supported; supported: {supported}")
    return kernel


def check_heads(hidden: int, heads: int, hidden_key: str, heads_key: str) -> None:
    """The hidden size must split into whole heads (config.json's names for the two in the message)."""
    if heads == 0 or hidden % heads:
        raise CheckpointError(f"config.json: {hidden_key}={hidden} does not split into {heads_key}={heads} heads")


def kernels(backend):
    """(attention kernels, block kernels) of the backend a call uses."""
    return _backends.kernels(backend), _backends.kernels(backend, family="blocks")


def token_ids(name: str, ids, vocab_size: int) -> tuple[np.ndarray, bool]:
    """``ids`` as a C-contiguous int64 (B, N) array checked to lie in [0, vocab); True if it came in as (N,)."""
    array = V.token_ids(name, ids, vocab_size)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (batch, seq_len) or (seq_len,), got {array.shape}")
    squeeze = array.ndim == 1
    return np.ascontiguousarray(array.reshape(1, -1) if squeeze else array), squeeze


def keep_mask(name: str, mask, shape: tuple[int, int]) -> np.ndarray | None:
    """A Hugging Face attention mask (1 / True = a real token, 0 = padding) as a bool (B, S) array, or None."""
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.ndim == 1 and shape[0] == 1:
        array = array[None]
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (1 = token, 0 = padding), got {array.shape}")
    if array.dtype != np.bool_:
        if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold 0 (padding) and 1 (token), got values {np.unique(array)[:5]}")
        array = array != 0
    return array


def key_bias(keep: np.ndarray | None, dtype) -> np.ndarray | None:
    """The attention kernels' key bias (B, S): 0 for tokens, -inf for padding; None when nothing is padded."""
    if keep is None or keep.all():
        return None
    return np.ascontiguousarray(np.where(keep, 0.0, -np.inf), dtype=dtype)


@functools.lru_cache(maxsize=64)
def _absent(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only zero-stride stand-in for an absent mask (kernels never read it); shared, as it cannot change."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)


def attend(kern, out, q, k, v, scale: float, causal: bool, causal_offset: int, bias) -> None:
    """out (B, H, L, d) = softmax(scale q kᵀ + masks) v with the backend's fused kernel; masks as structure."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    mask = _absent(q.dtype, (B, H, L, S))
    has_bias = bias is not None
    if not has_bias:
        bias = _absent(q.dtype, (B, S))
    lse = lse_scratch(kern, (B, H, L), q.dtype)  # TEMPORARY until cython-backward merges (then: np.empty)
    kern.attention(out, lse, q, k, v, float(scale), bool(causal), int(causal_offset), 0, mask, False, bias, has_bias)


#: Below this many elements in a step's widest activation (tokens x width), the kernels run on one thread: waking a
#: thread pool costs more than the work (a decode step of one token per sequence), and on a busy machine a woken
#: thread may wait a whole time slice for a core.
SERIAL_BELOW = 1 << 16


@contextlib.contextmanager
def threads_for(work: int, *modules):
    """Run the kernels of ``modules`` on one thread inside the block when ``work < SERIAL_BELOW``."""
    if work >= SERIAL_BELOW:
        yield
        return
    saved = [(m, m.get_num_threads()) for m in dict.fromkeys(modules) if hasattr(m, "set_num_threads")]
    for m, _ in saved:
        m.set_num_threads(1)
    try:
        yield
    finally:
        for m, n in saved:
            m.set_num_threads(n)
