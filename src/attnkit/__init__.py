"""attnkit: fast, exact transformer attention for NumPy on the CPU.

    >>> import numpy as np, attnkit
    >>> attnkit.softmax(np.array([1.0, 2.0, 3.0]))
    array([0.09003057, 0.24472847, 0.66524096])

The kernels are C (csrc/), chosen at import for the CPU's SIMD features and
run on OpenMP threads without the GIL; attnkit.reference is the same maths in
plain NumPy. `python -m attnkit` checks one against the other and times them.
"""
__version__ = "0.1.0"

from . import io, nn, reference
from ._runtime import (
    get_num_threads,
    set_num_threads,
    show_config,
    simd_path,
    supported_simd_paths,
)
from .functional import (
    batch_norm,
    layer_norm,
    log_softmax,
    rms_norm,
    scaled_dot_product_attention,
    softmax,
)

__all__ = [
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "scaled_dot_product_attention",
    "batch_norm",
    "reference",
    "nn",
    "io",
    "show_config",
    "simd_path",
    "supported_simd_paths",
    "set_num_threads",
    "get_num_threads",
]
