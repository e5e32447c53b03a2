"""All argument checking of the public API lives here.

Each check raises the exception NumPy would choose (``TypeError`` for a wrong kind of thing, ``ValueError`` for a
wrong value or shape, ``IndexError`` for an id out of range) with a message naming the argument, what was expected
and what came. Nothing here modifies its input; "normalising" means returning a new view or copy.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _describe(a) -> str:
    return f"dtype={a.dtype}" if isinstance(a, np.ndarray) else f"type {type(a).__name__}"


def _asarray(name: str, a) -> np.ndarray:
    """``np.asarray(a)``, with NumPy's complaint about a ragged nested sequence rephrased to name the argument."""
    try:
        return np.asarray(a)
    except ValueError as exc:  # "setting an array element with a sequence ... inhomogeneous shape"
        raise ValueError(f"{name} must be a rectangular array, got a ragged nested sequence ({exc})") from None


def float_array(name: str, a, *, min_ndim: int = 0, ndim: int | None = None) -> np.ndarray:
    """``a`` as a float32/float64 ndarray (a view when possible), checking its kind and dimensions."""
    if isinstance(a, (str, bytes)) or a is None:
        raise TypeError(f"{name} must be a float32 or float64 array, got {_describe(a)}")
    arr = _asarray(name, a)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32 or float64 array, got: {name}.dtype={arr.dtype}; "
            f"convert it with {name}.astype(np.float32)"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape {arr.shape}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {arr.shape}")
    return arr


def same_dtype(**arrays: np.ndarray | None) -> np.dtype:
    """The one dtype shared by the given arrays (None entries skipped); mixed dtypes are a TypeError."""
    present = {k: v for k, v in arrays.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}.dtype={v.dtype}" for k, v in present.items())
        raise TypeError(
            f"arrays must share one float dtype (no silent promotion), got: {listing}; cast them to one dtype"
        )
    return next(iter(dtypes))


def token_ids(name: str, ids, vocab_size: int) -> np.ndarray:
    """Integer ids, each in [0, vocab_size); returns an int64 array of the same shape."""
    if isinstance(ids, (str, bytes)) or ids is None:
        raise TypeError(f"{name} must be an integer array, got {_describe(ids)}")
    arr = _asarray(name, ids)
    if arr.size == 0 and not isinstance(ids, np.ndarray):  # [] or [[]] is float64 to NumPy: no ids (as NumPy's
        arr = arr.astype(np.int64)  # own indexing treats an empty list)
    if arr.dtype == object and arr.size and all(_is_int(i) for i in arr.flat):
        # Python ints beyond int64 (e.g. [2**70]) make an object array: still ids, and out of any vocabulary.
        lo, hi = min(int(i) for i in arr.flat), max(int(i) for i in arr.flat)
        _check_id_range(name, lo, hi, vocab_size)
        return arr.astype(np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of token ids, got: {name}.dtype={arr.dtype}")
    if arr.size:
        _check_id_range(name, int(arr.min()), int(arr.max()), vocab_size)
    return arr.astype(np.int64, copy=False)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_id_range(name: str, lo: int, hi: int, vocab_size: int) -> None:
    """IndexError unless every id lies in [0, vocab_size) (``lo``, ``hi``: the smallest and largest id)."""
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"{name} holds id {bad}, outside the vocabulary of size {vocab_size} "
            f"(ids must lie in [0, {vocab_size}); negative ids do not wrap around)"
        )


def positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def real_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}")
    return value


def float_dtype(name: str, dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def broadcast(names: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of the shapes, or a ValueError naming what did not broadcast."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(
            f"the leading (batch/head) dimensions of {names} do not broadcast: got " + ", ".join(str(s) for s in shapes)
        ) from None


def mask_array(name: str, mask, dtype: np.dtype, target: tuple[int, ...]) -> np.ndarray:
    """A boolean (True = takes part) or float (added) mask as an additive mask of ``dtype`` that broadcasts
    to ``target``. The mask keeps its own shape: nothing of size ``target`` is built here."""
    if isinstance(mask, (str, bytes)):
        raise TypeError(f"{name} must be a boolean or float array, got {_describe(mask)}")
    m = _asarray(name, mask)
    if m.dtype != np.bool_ and m.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a boolean (True = takes part) or float (added to the scores) array, "
            f"got: {name}.dtype={m.dtype}"
        )
    try:
        shape = np.broadcast_shapes(m.shape, target)
    except ValueError:
        shape = None
    if shape != tuple(target):
        raise ValueError(f"{name} of shape {m.shape} does not broadcast to the scores' shape {tuple(target)}")
    if m.dtype == np.bool_:
        return np.where(m, dtype.type(0), dtype.type(-np.inf))
    return m.astype(dtype, copy=False)


def key_padding(name: str, mask, dtype: np.dtype, batch: int, n_keys: int) -> np.ndarray:
    """A key-padding mask (B, S) or (S,): boolean True = padding (ignored), as in PyTorch's MultiheadAttention,
    or float (added to every score of that key). Returns the additive (B or 1, S) bias."""
    if isinstance(mask, (str, bytes)):
        raise TypeError(f"{name} must be a boolean or float array, got {_describe(mask)}")
    m = _asarray(name, mask)
    if m.dtype != np.bool_ and m.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a boolean (True = padding, ignored) or float array, got: {name}.dtype={m.dtype}"
        )
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[1] != n_keys or m.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (batch, keys) = ({batch}, {n_keys}), got shape {np.shape(mask)}")
    if m.dtype == np.bool_:
        return np.where(m, dtype.type(-np.inf), dtype.type(0))
    return m.astype(dtype, copy=False)


def weight(name: str, w, dtype: np.dtype, rows: int | None, *, cols: int | None = None) -> np.ndarray:
    """A 2-D projection weight (rows, cols) applied as ``x @ w``."""
    arr = float_array(name, w, ndim=2)
    if arr.dtype != dtype:
        raise TypeError(f"{name}.dtype={arr.dtype} differs from x.dtype={dtype}; cast them to one dtype")
    if rows is not None and arr.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (applied as x @ {name}), got shape {arr.shape}")
    if cols is not None and arr.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {arr.shape}")
    return arr


def bias(name: str, b, dtype: np.dtype, size: int) -> np.ndarray | None:
    if b is None:
        return None
    arr = float_array(name, b, ndim=1)
    if arr.dtype != dtype:
        raise TypeError(f"{name}.dtype={arr.dtype} differs from x.dtype={dtype}; cast them to one dtype")
    if arr.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},), got shape {arr.shape}")
    return arr


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def out_array(out, shape: tuple[int, ...], dtype: np.dtype, **inputs) -> np.ndarray | None:
    """``out=`` of a public function: None, or a writeable C-contiguous ndarray of exactly ``shape`` and ``dtype``
    that shares no memory with any of ``inputs`` (name -> the caller's array, as given or normalised)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array (or None), got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} (the result's), got: out.dtype={out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got shape {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous, got an array with strides " + str(out.strides))
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    for name, a in inputs.items():
        if isinstance(a, np.ndarray) and a.size and out.size and np.may_share_memory(out, a):
            raise ValueError(f"out must not share memory with {name} (the kernels read {name} while writing out)")
    return out
