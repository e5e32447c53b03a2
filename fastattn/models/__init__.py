"""Run Hugging Face checkpoints on fastattn's kernels: BERT-family encoders, GPT-2 and Llama-family decoders.

``load(path)`` reads a local model directory (``config.json`` + ``model.safetensors``, read with the safetensors
package's NumPy API: no PyTorch; bfloat16 tensors are widened from their bytes) and returns a ``BertModel``, a
``GPT2Model`` or a ``LlamaModel`` (Llama, Mistral, Qwen2, Qwen3) by ``config.json``'s ``model_type``; or a single
GGUF file (llama.cpp's format, read with the ``gguf`` package, quantized tensors dequantized at load) as a
``LlamaModel``. All models share one base (``fastattn.models.base``): tensor maps, loading, tokenizer, KV cache,
generation. Every block runs on the chosen backend: the embedding gather fused with the position add, the fused
attention kernel with padding as structure, and compiled LayerNorm / GELU / bias-and-residual kernels; the matmuls
use BLAS. Text goes through the tokenizers package when the directory has a ``tokenizer.json``.

The optional dependencies (``pip install "fastattn[models]"``: safetensors, tokenizers) are imported only when a
model is loaded.

Threads: a block alternates BLAS matmuls (NumPy's OpenBLAS threads) with the compiled kernels (an OpenMP thread
pool). OpenMP's idle threads spin by default, and on a small machine the spinning steals the cores the next matmul
needs (the 6-layer encoder ran 1.3-1.5x slower on 2 cores). Importing this package therefore sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it (yours wins); it takes effect when the OpenMP
runtime of the kernels starts, so import ``fastattn.models`` before running any fastattn kernel. Decode steps of a
few tokens run their kernels on one thread (waking a pool costs more than the work).

Examples
--------
>>> import numpy as np, fastattn.models
>>> encoder = fastattn.models.load("path/to/all-MiniLM-L6-v2")              # doctest: +SKIP
>>> encoder.encode(["The dog chased the cat."]).shape                         # doctest: +SKIP
(1, 384)
>>> decoder = fastattn.models.load("path/to/gpt2", backend="cython")          # doctest: +SKIP
>>> out = decoder.generate(np.array([[464, 3290, 318]]), max_new_tokens=20)   # doctest: +SKIP
>>> out.sequences.shape, round(out.tokens_per_second)                         # doctest: +SKIP
"""

from __future__ import annotations

import os

# Before any OpenMP runtime of the kernels starts (see "Threads" above); the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from .. import _backends  # noqa: E402
from .. import _validation as V  # noqa: E402
from ._checkpoint import CheckpointError, read_config  # noqa: E402
from .base import DecoderOutput, GenerationOutput, KVCache  # noqa: E402
from .bert import BertConfig, BertModel, EncoderOutput  # noqa: E402
from .gpt2 import GPT2Config, GPT2Model  # noqa: E402
from .llama import LlamaConfig, LlamaModel  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = [
    "load",
    "BertModel",
    "GPT2Model",
    "LlamaModel",
    "BertConfig",
    "GPT2Config",
    "LlamaConfig",
    "EncoderOutput",
    "DecoderOutput",
    "GenerationOutput",
    "KVCache",
    "Tokenizer",
    "CheckpointError",
    "ENCODER_TYPES",
    "DECODER_TYPES",
]

#: config.json model_type values that ``load`` runs, by class.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def load(path, *, backend: str | None = None, dtype=np.float32) -> BertModel | GPT2Model | LlamaModel:
    """Load a local Hugging Face model directory or a GGUF file as a ``BertModel`` (encoder), a ``GPT2Model`` or a
    ``LlamaModel`` (decoders).

    Parameters
    ----------
    path : str or os.PathLike
        A directory with ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``);
        ``tokenizer.json`` and sentence-transformers' ``modules.json`` / ``1_Pooling/config.json`` are used when
        present. Or the path of a ``.gguf`` file (architectures llama, mistral, qwen2, qwen3; tensor types F32,
        F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), whose metadata gives the config and the tokenizer.
    backend : str, optional
        ``"numba"``, ``"cython"`` or ``"numpy"`` (the oracle) for every call of the model; None follows
        ``fastattn.use_backend`` / ``FASTATTN_BACKEND`` / the automatic choice at each call.
    dtype : float32 or float64
        The precision of the weights and of every computation.

    Returns
    -------
    BertModel, GPT2Model or LlamaModel
        Chosen by ``config.json``'s ``model_type`` (else its ``architectures``), or the GGUF's architecture.

    Raises
    ------
    FileNotFoundError
        No such directory, or no ``config.json`` / ``model.safetensors`` in it.
    CheckpointError
        An unsupported architecture, a missing tensor or a tensor whose shape disagrees with ``config.json``
        (the message names it).
    ImportError
        safetensors (or, for GGUF, gguf) is not installed (``pip install "fastattn[models]"``).

    Examples
    --------
    >>> import fastattn.models
    >>> model = fastattn.models.load("path/to/model", backend="numba")       # doctest: +SKIP
    >>> type(model).__name__                                                 # doctest: +SKIP
    'BertModel'
    """
    path = os.fspath(path)
    dtype = V.float_dtype("dtype", dtype)
    if backend is not None:
        backend = _backends.resolve_name(backend)  # an unknown or unavailable backend fails here, not later
    if os.path.isfile(path):
        from . import gguf_file

        return gguf_file.load(path, backend=backend, dtype=dtype)
    config = read_config(path)
    kind = _kind(config, path)
    if kind == "encoder":
        cls = BertModel
    else:
        cls = LlamaModel if config.get("model_type") in LlamaModel.model_types else GPT2Model
    return cls.from_pretrained(path, backend=backend, dtype=dtype, config=config)


def _kind(config: dict, path: str) -> str:
    model_type = config.get("model_type")
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in DECODER_TYPES:
        return "decoder"
    architectures = config.get("architectures") or []
    if model_type is None:
        if any(str(a).startswith(("Bert", "Roberta", "XLMRoberta")) for a in architectures):
            return "encoder"
        if any(str(a).startswith("GPT2") for a in architectures):
            return "decoder"
        if any(str(a).startswith(("Llama", "Mistral", "Qwen2", "Qwen3")) for a in architectures):
            raise CheckpointError(
                f"{os.path.join(path, 'config.json')}: a {architectures[0]} checkpoint without model_type: add "
                '"model_type" (llama, mistral, qwen2 or qwen3) to config.json'
            )
    raise CheckpointError(
        f"{os.path.join(path, 'config.json')}: unsupported model_type {model_type!r} (architectures "
        f"{architectures}); fastattn.models runs BERT-family encoders (model_type {', '.join(ENCODER_TYPES)}) and "
        f"GPT-2 and Llama-family decoders (model_type {', '.join(DECODER_TYPES)})"
    )
