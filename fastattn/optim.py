"""Optimisation for training on fastattn: AdamW, gradient clipping, a warm-up + cosine learning-rate schedule.

Parameters and gradients are dicts from names to NumPy arrays (``GPT2Model.parameters()`` and the ``grads`` of
``GPT2Model.loss_and_grads``); the optimizer updates the parameter arrays in place. The numbers follow PyTorch:
``AdamW.step`` is ``torch.optim.AdamW``'s update, ``clip_grad_norm`` is ``torch.nn.utils.clip_grad_norm_``.

Every entry point checks all of its input before it changes anything: a bad gradient (missing, of the wrong shape
or dtype, NaN or infinite) raises and leaves the weights and the optimizer state as they were.

Examples
--------
>>> import numpy as np
>>> from fastattn.optim import AdamW, clip_grad_norm, warmup_cosine
>>> params = {"w": np.ones(3)}
>>> opt = AdamW(params, lr=0.1, weight_decay=0.0)
>>> grads = {"w": np.array([1.0, -2.0, 0.5])}
>>> round(clip_grad_norm(grads, 1.0), 4)
2.2913
>>> opt.step(grads)
>>> params["w"].round(4).tolist()
[0.9, 1.1, 0.9]
>>> [round(warmup_cosine(s, max_lr=1.0, warmup_steps=2, total_steps=6), 3) for s in range(7)]
[0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["AdamW", "clip_grad_norm", "warmup_cosine"]


def _number(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        raise ValueError(f"{name} must be a finite number {' and '.join(b for b in (lo, hi) if b)}, got {value}")
    return value


def _check_params(params) -> dict[str, np.ndarray]:
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params must be a non-empty dict of name -> ndarray, got {type(params).__name__}")
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{name!r}] must be a float32 or float64 ndarray, got {_describe(p)}")
        if not p.flags.writeable:
            raise ValueError(f"params[{name!r}] is read-only: the optimizer updates parameters in place")
    return dict(params)


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"ndarray of dtype {a.dtype} and shape {a.shape}"
    return type(a).__name__


def _check_grads(grads, params: dict[str, np.ndarray], *, finite: bool = True) -> None:
    """Every parameter has a gradient of its shape and dtype, finite, and there is no other; else raise."""
    if not isinstance(grads, dict):
        raise TypeError(f"grads must be a dict of name -> ndarray (as params), got {type(grads).__name__}")
    missing = [n for n in params if n not in grads]
    extra = [n for n in grads if n not in params]
    if missing or extra:
        raise KeyError(f"grads must have exactly the names of params; missing {missing[:5]}, unknown {extra[:5]}")
    for name, p in params.items():
        g = grads[name]
        if not isinstance(g, np.ndarray) or g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"grads[{name!r}] must be an ndarray of dtype {p.dtype} and shape {p.shape}, got "
                             f"{_describe(g)}")  # fmt: skip
        if finite and not np.isfinite(g).all():
            raise ValueError(f"grads[{name!r}] holds NaN or infinite values; nothing was updated")


def clip_grad_norm(grads: dict, max_norm: float, norm_type: float = 2.0) -> float:
    """Scale ``grads`` in place so that their total norm is at most ``max_norm``; return the norm before.

    As ``torch.nn.utils.clip_grad_norm_``: the total norm is the ``norm_type``-norm of all the gradients taken as
    one vector (2 or ``inf``), and every gradient is multiplied by ``min(1, max_norm / (total + 1e-6))``.
    The norm is accumulated in float64. A NaN or infinite norm raises ``ValueError`` and changes nothing.
    """
    max_norm = _number("max_norm", max_norm, low=0.0, low_open=True)
    if norm_type not in (2, 2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    if not isinstance(grads, dict) or not grads:
        raise TypeError(f"grads must be a non-empty dict of name -> ndarray, got {type(grads).__name__}")
    for name, g in grads.items():
        if not isinstance(g, np.ndarray) or g.dtype not in (np.float32, np.float64):
            raise TypeError(f"grads[{name!r}] must be a float32 or float64 ndarray, got {_describe(g)}")
        if not g.flags.writeable:
            raise ValueError(f"grads[{name!r}] is read-only: clipping scales the gradients in place")
    if norm_type == math.inf:
        total = max(float(np.max(np.abs(g), initial=0.0)) for g in grads.values())
    else:
        total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if not math.isfinite(total):
        raise ValueError(f"the total gradient norm is {total}: a gradient holds NaN or infinite values")
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total


def warmup_cosine(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up to ``max_lr`` over ``warmup_steps`` steps
    (``max_lr · (step + 1) / warmup_steps``), then a cosine decay to ``min_lr`` at ``total_steps``, ``min_lr``
    after. Use it with ``AdamW.lr`` (``opt.lr = warmup_cosine(step, ...)`` before each ``step``) or as the factor
    of ``torch.optim.lr_scheduler.LambdaLR`` (divided by ``max_lr``)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    max_lr = _number("max_lr", max_lr, low=0.0)
    min_lr = _number("min_lr", min_lr, low=0.0, high=max_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    ratio = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class AdamW:
    """Adam with decoupled weight decay, ``torch.optim.AdamW``'s update, on a dict of NumPy arrays.

    For each parameter p with gradient g, at step t (from 1)::

        p ← p · (1 − lr · weight_decay)
        m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²
        p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)

    ``lr`` is an attribute: set it before a step to follow a schedule (``warmup_cosine``). The moments have the
    parameters' dtype.

    Parameters
    ----------
    params : dict of str -> ndarray
        The arrays to update in place (``GPT2Model.parameters()``).
    lr, betas, eps, weight_decay
        As torch.optim.AdamW (defaults the same).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = _check_params(params)
        self.lr = _number("lr", lr, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
        )
        self.eps = _number("eps", eps, low=0.0)
        self.weight_decay = _number("weight_decay", weight_decay, low=0.0)
        self.step_count = 0
        self.exp_avg = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in self.params.items()}

    def step(self, grads: dict) -> None:
        """One update of every parameter with ``grads`` (a dict with exactly the parameters' names).

        Raises (and changes nothing) when a gradient is missing, of another shape or dtype, or not finite, or when
        ``lr`` was set to something that is not a finite number >= 0.
        """
        lr = _number("lr", self.lr, low=0.0)
        _check_grads(grads, self.params)
        self.step_count += 1
        t = self.step_count
        beta1, beta2 = self.betas
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        step_size = lr / bias_correction1
        for name, p in self.params.items():
            g, m, v = grads[name], self.exp_avg[name], self.exp_avg_sq[name]
            typ = p.dtype.type
            if self.weight_decay:
                p *= typ(1.0 - lr * self.weight_decay)  # decoupled weight decay
            m += (g - m) * typ(1.0 - beta1)  # torch's lerp(m, g, 1 - beta1)
            v *= typ(beta2)
            v += typ(1.0 - beta2) * g * g
            denom = np.sqrt(v)
            denom /= typ(bias_correction2_sqrt)
            denom += typ(self.eps)
            np.divide(m, denom, out=denom)
            denom *= typ(step_size)
            p -= denom

    def state_dict(self) -> dict:
        """A copy of the state: hyperparameters, the step count and both moments (dicts of arrays)."""
        return {
            "lr": self.lr,
            "betas": tuple(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "step": self.step_count,
            "exp_avg": {n: a.copy() for n, a in self.exp_avg.items()},
            "exp_avg_sq": {n: a.copy() for n, a in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; checked entirely first (nothing changes on error), then copied in."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from AdamW.state_dict(), got {type(state).__name__}")
        keys = ("lr", "betas", "eps", "weight_decay", "step", "exp_avg", "exp_avg_sq")
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"state lacks {missing} (expected the keys of AdamW.state_dict(): {list(keys)})")
        step = state["step"]
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state['step'] must be an integer >= 0, got {step!r}")
        probe = AdamW(self.params, state["lr"], state["betas"], state["eps"], state["weight_decay"])  # checks them
        for key in ("exp_avg", "exp_avg_sq"):
            try:
                _check_grads(state[key], self.params)
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"state[{key!r}] does not fit the parameters: {exc}") from exc
        self.lr, self.betas, self.eps, self.weight_decay = probe.lr, probe.betas, probe.eps, probe.weight_decay
        self.step_count = int(step)
        self.exp_avg = {n: np.array(state["exp_avg"][n], copy=True) for n in self.params}
        self.exp_avg_sq = {n: np.array(state["exp_avg_sq"][n], copy=True) for n in self.params}
