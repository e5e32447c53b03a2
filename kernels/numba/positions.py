"""Positional information: learned/absolute positions added to X (``add_positions``) and rotary embedding
(``rope``), both one parallel pass over the B·N rows."""

from __future__ import annotations

from numba import njit, prange

from ._config import PARALLEL


@njit(**PARALLEL)
def add_positions(out, x, positions, offset):
    """out[b, n] = x[b, n] + positions[offset + n].   out, x (B, N, D), positions (P, D)."""
    B, N, D = x.shape
    for r in prange(B * N):  # one flat loop over rows: parallel even when B == 1
        b = r // N
        n = r - b * N
        pos = positions[offset + n]  # (D,)
        for c in range(D):
            out[b, n, c] = x[b, n, c] + pos[c]


@njit(**PARALLEL)
def rope(out, x, cos, sin, interleaved):
    """Rotary embedding of x (B, N, d) with cos, sin (N, d//2); see kernels/README.md for both layouts.

    ``interleaved=False`` rotates the pairs (i, i + d/2) (GPT-NeoX, Hugging Face Llama);
    ``interleaved=True`` rotates the pairs (2i, 2i + 1) (original Llama, GPT-J).
    """
    B, N, d = x.shape
    h = d // 2
    for r in prange(B * N):
        b = r // N
        n = r - b * N
        xr = x[b, n]  # (d,)
        o = out[b, n]  # (d,)
        c = cos[n]  # (h,)
        s = sin[n]  # (h,)
        if interleaved:
            for i in range(h):
                x0 = xr[2 * i]
                x1 = xr[2 * i + 1]
                o[2 * i] = x0 * c[i] - x1 * s[i]
                o[2 * i + 1] = x1 * c[i] + x0 * s[i]
        else:
            for i in range(h):
                x0 = xr[i]
                x1 = xr[i + h]
                o[i] = x0 * c[i] - x1 * s[i]
                o[i + h] = x1 * c[i] + x0 * s[i]
        if d % 2 == 1:  # an odd last feature has no partner: it passes through unrotated
            o[d - 1] = xr[d - 1]


@njit(**PARALLEL)
def add_positions_backward(grad_positions, grad_out, offset):
    """grad_positions[offset + n] = sum over b of grad_out[b, n] (increasing b); every other row 0.

    grad_positions (P, D), grad_out (B, N, D). One writer per row: bitwise the same for any thread count.
    """
    P, D = grad_positions.shape
    B, N, _ = grad_out.shape
    for p in prange(P):
        row = grad_positions[p]  # (D,)
        for c in range(D):
            row[c] = 0.0
        n = p - offset
        if 0 <= n < N:
            for b in range(B):
                src = grad_out[b, n]  # (D,)
                for c in range(D):
                    row[c] += src[c]
