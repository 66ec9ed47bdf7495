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
# for a while as GNU OpenMP's do by default: spinning threads fight NumPy's BLAS
# threads for the cores between kernels (a multi-head attention call on 2
# threads took 9 ms spinning, 2.2 ms sleeping). The runtime reads the policy
# once, when it loads with the extension below; the variable is put back at
# once, so other OpenMP runtimes loaded later (PyTorch's own, say) see the
# user's environment. A policy the user set is kept.
_user_wait_policy = _os.environ.get("OMP_WAIT_POLICY")
if _user_wait_policy is None:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    from . import _kernels  # noqa: E402
finally:
    if _user_wait_policy is None:
        _os.environ.pop("OMP_WAIT_POLICY", None)

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
