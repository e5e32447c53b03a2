"""Reading a Hugging Face model directory: ``config.json``, the safetensors weights, and what they must agree on.

Weights are read with the ``safetensors`` package's NumPy API (never torch), imported only when a model is loaded.
NumPy has no bfloat16, so bfloat16 tensors are read from their bytes (the file's header gives each tensor's byte
range) and widened exactly: a bfloat16 is the top 16 bits of a float32.
Every problem is a ``CheckpointError`` (a ``ValueError``) that names the file or the tensor and says what was
expected: an unknown architecture, a missing tensor, a shape that disagrees with ``config.json``.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

INSTALL_HINT = 'pip install "fastattn[models]"'

WEIGHT_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A model directory that fastattn cannot run: unsupported architecture, missing tensor, wrong shape."""


def import_safetensors():
    """``safetensors.safe_open``, or an ImportError that says how to install it."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError(
            f"fastattn.models reads checkpoints with the safetensors package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return safe_open


def read_config(directory: str) -> dict:
    """The parsed ``config.json`` of a model directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model directory at {directory!r}")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no config.json: is it a Hugging Face model directory?")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_json(directory: str, *parts: str) -> dict | list | None:
    """A JSON file inside the model directory, or None when it is absent."""
    path = os.path.join(directory, *parts)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_value(config: dict, names, kind, *, default=None, required=True):
    """The first of ``names`` present in ``config`` (aliases such as ``n_embd`` / ``hidden_size``), checked."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name in config and config[name] is not None:
            value = config[name]
            break
    else:
        if default is not None or not required:
            return default
        raise CheckpointError(f"config.json lacks {names[0]!r}, which a {config.get('model_type')} model needs")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"config.json: {name} must be a non-negative integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"config.json: {name} must be a number, got {value!r}")
        value = float(value)
    return value


class TensorStore:
    """The tensors of ``model.safetensors`` (or of the shards listed in ``model.safetensors.index.json``).

    Tensors are read one at a time (``get``), converted to the model dtype and checked against the shape that
    ``config.json`` implies. ``prefix`` is found from an anchor tensor: checkpoints of a task model keep the
    encoder under ``bert.`` or the decoder under ``transformer.``.
    """

    def __init__(self, directory: str):
        self.directory = directory
        safe_open = import_safetensors()
        single = os.path.join(directory, WEIGHT_FILE)
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        else:
            others = [
                n
                for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                if os.path.isfile(os.path.join(directory, n))
            ]
            hint = (
                f" (it has {', '.join(others)}: re-save it with save_pretrained(..., safe_serialization=True))"
                if others
                else ""
            )
            raise FileNotFoundError(f"{directory!r} has no {WEIGHT_FILE}{hint}")
        self._where: dict[str, str] = {}
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    self._where[name] = path
        self._used: set[str] = set()
        self.prefix = ""

    def names(self) -> set[str]:
        return set(self._where)

    def find_prefix(self, anchor: str, candidates) -> str:
        """The first of ``candidates`` (e.g. ``("", "bert.")``) under which ``anchor`` exists; sets ``prefix``."""
        for prefix in candidates:
            if prefix + anchor in self._where:
                self.prefix = prefix
                return prefix
        raise CheckpointError(
            f"{WEIGHT_FILE} in {self.directory!r} is missing the tensor {anchor!r} "
            f"(looked for it under the prefixes {list(candidates)})"
        )

    def has(self, name: str) -> bool:
        return self.prefix + name in self._where

    def get(self, name: str, shape: tuple[int, ...], dtype, *, what: str = "") -> np.ndarray:
        """Tensor ``prefix + name`` as a C-contiguous array of ``dtype``, checked to have ``shape``."""
        full = self.prefix + name
        if full not in self._where:
            raise CheckpointError(
                f"{WEIGHT_FILE} in {self.directory!r} is missing the tensor {full!r}" + (f" ({what})" if what else "")
            )
        safe_open = import_safetensors()
        path = self._where[full]
        try:
            if _header(path)[1].get(full, {}).get("dtype") == "BF16":
                array = read_bfloat16(path, full)
            else:
                with safe_open(path, framework="numpy") as f:
                    array = f.get_tensor(full)
        except Exception as exc:  # a type NumPy cannot represent (e.g. float8), a truncated file
            raise CheckpointError(f"cannot read the tensor {full!r} with NumPy: {exc}") from exc
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"the tensor {full!r} has shape {tuple(array.shape)} but config.json implies {tuple(shape)}"
                + (f" ({what})" if what else "")
            )
        if array.dtype.kind != "f":
            raise CheckpointError(f"the tensor {full!r} has dtype {array.dtype}, expected a floating type")
        self._used.add(full)
        return np.ascontiguousarray(array, dtype=dtype)


def _header(path: str) -> tuple[int, dict]:
    """(header length, header) of a safetensors file: 8 bytes of little-endian length, then that much JSON."""
    st = os.stat(path)
    return _header_of(path, st.st_mtime_ns, st.st_size)  # a rewritten file is read again


@functools.lru_cache(maxsize=16)
def _header_of(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def read_bfloat16(path: str, name: str) -> np.ndarray:
    """A bfloat16 tensor of a safetensors file as float32, exactly (its 16 bits become a float32's top 16)."""
    n, header = _header(path)
    info = header[name]
    start, end = info["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + n + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


class DictStore:
    """In-memory tensors (name -> array, e.g. a state dict turned into NumPy) behind ``TensorStore``'s interface."""

    def __init__(self, tensors: dict, where: str = "the tensors given"):
        self._tensors = dict(tensors)
        self.directory = where
        self.prefix = ""

    def names(self) -> set[str]:
        return set(self._tensors)

    def find_prefix(self, anchor: str, candidates) -> str:
        for prefix in candidates:
            if prefix + anchor in self._tensors:
                self.prefix = prefix
                return prefix
        raise CheckpointError(f"{self.directory} lack the tensor {anchor!r} (looked under {list(candidates)})")

    def has(self, name: str) -> bool:
        return self.prefix + name in self._tensors

    def get(self, name: str, shape: tuple[int, ...], dtype, *, what: str = "") -> np.ndarray:
        full = self.prefix + name
        if full not in self._tensors:
            raise CheckpointError(f"{self.directory} lack the tensor {full!r}" + (f" ({what})" if what else ""))
        array = np.asarray(self._tensors[full])
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"the tensor {full!r} has shape {tuple(array.shape)} but the config implies {tuple(shape)}"
                + (f" ({what})" if what else "")
            )
        if array.dtype.kind != "f":
            raise CheckpointError(f"the tensor {full!r} has dtype {array.dtype}, expected a floating type")
        return np.ascontiguousarray(array, dtype=dtype)
