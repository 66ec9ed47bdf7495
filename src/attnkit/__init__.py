"""attnkit: fast, exact transformer attention for NumPy on the CPU.

    >>> import numpy as np, attnkit
    >>> attnkit.softmax(np.array([1.0, 2.0, 3.0]))
    array([0.09003057, 0.24472847, 0.66524096])

The kernels are C (csrc/), chosen at import for the CPU's SIMD features and
run on OpenMP threads without the GIL; attnkit.reference is the same maths in
plain NumPy. `python -m attnkit` checks one against the other and times them.
"""
__version__ = "0.1.0"

import os as _os

# attnkit's OpenMP threads sleep as soon as a kernel ends, instead of spinning
# for a while as GNU OpenMP's do by default: spinning threads fight other
# libraries' threads (NumPy's BLAS, PyTorch) for the cores between kernels (a
# multi-head attention call on 2 threads took 9 ms spinning, 2.2 ms sleeping).
# The runtime reads the policy once, when it loads with the extension below;
# the variable is put back at once, so other OpenMP runtimes loaded later
# (PyTorch's own, say) see the user's environment. A policy the user set is
# kept. Every product attnkit computes is its own GEMM on these threads, so
# NumPy's BLAS threads are no longer on its paths and need no setting here.
_defaults = {"OMP_WAIT_POLICY": "PASSIVE"}
_defaults = {name: value for name, value in _defaults.items() if name not in _os.environ}
_os.environ.update(_defaults)
try:
    from . import _kernels  # noqa: E402
finally:
    for _name in _defaults:
        _os.environ.pop(_name, None)

from . import io, nn, optim, progress, reference
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
    layer_norm_backward,
    log_softmax,
    log_softmax_backward,
    rms_norm,
    rms_norm_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    softmax,
    softmax_backward,
)

__all__ = [
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "batch_norm",
    "softmax_backward",
    "log_softmax_backward",
    "layer_norm_backward",
    "rms_norm_backward",
    "reference",
    "nn",
    "optim",
    "io",
    "show_config",
    "simd_path",
    "supported_simd_paths",
    "set_num_threads",
    "get_num_threads",
]
