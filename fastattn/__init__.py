"""fastattn: hand-written parallel CPU kernels for the transformer forward and backward passes, checked against a
NumPy oracle.

The pipeline: token ids -> ``embed`` -> ``add_positions`` (or ``apply_rope``) -> ``self_attention``
(``scaled_dot_product_attention`` inside), composed by ``forward``. Every function takes ``backend=``:
``"numba"``, ``"cython"`` or ``"numpy"`` (the oracle in ``fastattn.oracle``).
"""

from ._backends import available_backends, backend_status, use_backend
from ._threads import get_num_threads, set_num_threads, warmup
from .backward import (
    add_positions_backward,
    apply_rope_backward,
    embed_backward,
    scaled_dot_product_attention_backward,
    self_attention_backward,
)
from .functional import (
    add_positions,
    apply_rope,
    embed,
    scaled_dot_product_attention,
    self_attention,
    sinusoidal_positions,
)
from .model import Params, forward, init_params

__version__ = "0.1.0"

__all__ = [
    "embed",
    "sinusoidal_positions",
    "add_positions",
    "apply_rope",
    "scaled_dot_product_attention",
    "self_attention",
    "forward",
    "embed_backward",
    "add_positions_backward",
    "apply_rope_backward",
    "scaled_dot_product_attention_backward",
    "self_attention_backward",
    "Params",
    "init_params",
    "available_backends",
    "backend_status",
    "use_backend",
    "get_num_threads",
    "set_num_threads",
    "warmup",
]
