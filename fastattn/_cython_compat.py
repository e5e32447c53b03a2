# TEMPORARY until cython-backward merges: this whole module is deleted at the merge (see CONTRACT.md).
"""An adapter that gives the Cython backend of this branch the forward kernel signatures of CONTRACT.md.

The Cython kernels on this branch still have the old ``attention(out, q, k, v, scale, causal, causal_offset, mask,
...)`` and ``scores(out, q, k, scale, causal, causal_offset, mask, ...)``. ``adapt`` wraps the module: the new
``attention`` fills ``lse`` by a second pass (the Cython ``scores`` kernel a block of rows at a time, memory
bounded) only when the caller asks for it (``lse`` not None; ``lse_scratch`` gives None for the adapter), and both
raise for ``window > 0``. Once the Cython module has ``attention_backward`` (the new kernels), it is used as it is.
"""

from __future__ import annotations

import numpy as np

_ROWS_BUDGET = 1 << 21  # score elements computed at a time by the lse pass (8 MiB in float32)


def lse_scratch(kern, shape, dtype):
    """The ``lse`` argument for a caller that does not want it: a scratch array, or None for the adapter."""
    if isinstance(kern, CythonAdapter):
        return None
    return np.empty(shape, dtype)


class CythonAdapter:
    """The Cython kernel module with the new forward signatures (everything else passes through)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    @staticmethod
    def _no_window(window):
        if window:
            raise ValueError(
                f"window={window}: the Cython kernels of this build have no sliding window; use backend='numba'"
            )

    def scores(self, out, q, k, scale, causal, causal_offset, window, mask, has_mask, key_bias, has_key_bias):
        self._no_window(window)
        self._module.scores(out, q, k, scale, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)

    def attention(self, out, lse, q, k, v, scale, causal, causal_offset, window, mask, has_mask, key_bias,
                  has_key_bias):  # fmt: skip
        self._no_window(window)
        self._module.attention(out, q, k, v, scale, causal, causal_offset, mask, has_mask, key_bias, has_key_bias)
        if lse is None:
            return
        B, Hq, L, _ = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rows = max(1, _ROWS_BUDGET // max(1, S))
        s = np.empty((1, 1, min(rows, L), S), q.dtype)
        for b in range(B):
            for h in range(Hq):
                hk = h // (Hq // Hkv)
                for r0 in range(0, L, rows):
                    r1 = min(L, r0 + rows)
                    blk = s[:, :, : r1 - r0]
                    self._module.scores(blk, np.ascontiguousarray(q[b : b + 1, h : h + 1, r0:r1]),
                                        np.ascontiguousarray(k[b : b + 1, hk : hk + 1]), scale, causal,
                                        causal_offset + r0, mask[b : b + 1, h : h + 1, r0:r1], has_mask,
                                        key_bias[b : b + 1], has_key_bias)  # fmt: skip
                    m = blk.max(axis=-1, keepdims=True)
                    m = np.where(np.isneginf(m), 0, m)
                    with np.errstate(divide="ignore"):
                        lse[b, h, r0:r1] = (np.log(np.exp(blk - m).sum(axis=-1)) + m[..., 0])[0, 0]


def adapt(module):
    """``module`` wrapped when it still has the old signatures (no ``attention_backward``), else as it is."""
    if hasattr(module, "attention_backward") or not hasattr(module, "attention"):
        return module
    return CythonAdapter(module)
