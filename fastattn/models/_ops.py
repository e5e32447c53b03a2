"""What the encoder and the decoder share: input checks, activation choice, masks as key biases, thread choice.

The models call the backends' raw kernels directly (the attention kernel of kernels/README.md and the block kernels
of ``fastattn._numpy_blocks``), on arrays they allocated themselves: C-contiguous, one dtype.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import _backends, _threads
from .. import _validation as V
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


#: Below this many elements in a step's widest activation (tokens x width), the kernels run on one thread: waking a
#: thread pool costs more than the work (a decode step of one token per sequence), and on a busy machine a woken
#: thread may wait a whole time slice for a core.
SERIAL_BELOW = 1 << 16


def threads_for(work: int, *modules):
    """Run the kernels of ``modules`` launched from this thread on one thread inside the block when
    ``work < SERIAL_BELOW``. Only the calling thread is affected: concurrent calls elsewhere keep their count."""
    if work >= SERIAL_BELOW:
        return contextlib.nullcontext()
    return _threads.local_threads(1, *modules)


#: Steps of at most this many token rows (decoding) run their matmuls on the block kernels' ``linear``: dot products
#: along the rows of a weight kept in Hugging Face's (out, in) layout, on the block kernels' threads. Measured on the
#: 2-core machine beside other work, NumPy's OpenBLAS threads made a SmolLM2-size decode step 10x slower than one
#: thread: each small GEMV waited for a second thread that had no core.
LINEAR_ROWS = 16


def linear(blk, out, x, w) -> None:
    """out (T, N) = x (T, K) @ wᵀ for a weight w (N, K): ``blk.linear`` for a few rows, else BLAS (which reads the
    transposed view in place)."""
    if x.shape[0] <= LINEAR_ROWS:
        blk.linear(out, x, w)
    else:
        np.matmul(x, w.T, out=out)
