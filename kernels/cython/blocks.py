"""The Cython backend's block kernels (``_blocks.pyx``): the same names and signatures as ``fastattn._numpy_blocks``.

A thin module over the compiled extension, in the widest instruction set this CPU runs (``ISA``: "avx512", "avx2"
or "baseline"; setup.py builds the variants and ``fastattn.kernels.cython`` picks among them, as for attention).
When ``_blocks`` was not built (no C compiler or Cython at install time) or does not load, importing this module
raises ``ImportError`` saying why, and the registry reports that the ``cython`` backend has no block kernels.
"""

from __future__ import annotations

import operator

import numpy as np

try:
    from . import _widest_build

    _blocks, ISA = _widest_build("_blocks")  # _blocks_avx512, _blocks_avx2 or _blocks (FASTATTN_CYTHON_ISA caps it)
except ImportError as exc:  # not built, or built for another Python: say so once, clearly
    raise ImportError(
        f"the Cython block kernels (fastattn.kernels.cython._blocks) are not available: {exc}; "
        "reinstall fastattn with Cython and a C compiler to build them"
    ) from exc

embedding = _blocks.embedding
layer_norm = _blocks.layer_norm
gelu = _blocks.gelu
gelu_tanh = _blocks.gelu_tanh
bias_gelu = _blocks.bias_gelu
bias_gelu_tanh = _blocks.bias_gelu_tanh
bias_residual = _blocks.bias_residual
bias_residual_layer_norm = _blocks.bias_residual_layer_norm
bias_residual_and_layer_norm = _blocks.bias_residual_and_layer_norm
split_qkv = _blocks.split_qkv
merge_heads = _blocks.merge_heads
openmp_enabled = _blocks.openmp_enabled
layer_norm_backward = _blocks.layer_norm_backward
gelu_backward = _blocks.gelu_backward
gelu_tanh_backward = _blocks.gelu_tanh_backward
bias_gelu_backward = _blocks.bias_gelu_backward
bias_gelu_tanh_backward = _blocks.bias_gelu_tanh_backward
bias_backward = _blocks.bias_backward
split_qkv_backward = _blocks.split_qkv_backward
merge_heads_backward = _blocks.merge_heads_backward
cross_entropy = _blocks.cross_entropy

__all__ = [
    "embedding",
    "layer_norm",
    "gelu",
    "gelu_tanh",
    "bias_gelu",
    "bias_gelu_tanh",
    "bias_residual",
    "bias_residual_layer_norm",
    "bias_residual_and_layer_norm",
    "split_qkv",
    "merge_heads",
    "layer_norm_backward",
    "gelu_backward",
    "gelu_tanh_backward",
    "bias_gelu_backward",
    "bias_gelu_tanh_backward",
    "bias_backward",
    "linear_backward",
    "split_qkv_backward",
    "merge_heads_backward",
    "cross_entropy",
    "get_num_threads",
    "set_num_threads",
    "openmp_enabled",
    "ISA",
]


def get_num_threads() -> int:
    """Threads the parallel loops of the block kernels use (1 without OpenMP)."""
    return _blocks.get_num_threads() if openmp_enabled() else 1


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in every block kernel from now on (no effect without OpenMP)."""
    try:
        count = operator.index(n)
    except TypeError:
        count = 0
    if isinstance(n, bool) or count < 1:
        raise ValueError(f"set_num_threads needs an int >= 1, got: {n!r}")
    _blocks._set_num_threads(count)


def linear_backward(grad_x, grad_w, grad_out, x, w):
    """y = x @ w: grad_x = grad_out @ wᵀ, grad_w = xᵀ @ grad_out (BLAS, through NumPy)."""
    np.matmul(grad_out, w.T, out=grad_x)
    np.matmul(x.T, grad_out, out=grad_w)
