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
import sys as _sys

# attnkit's OpenMP threads sleep as soon as a kernel ends, instead of spinning
# for a while as GNU OpenMP's do by default: spinning threads fight NumPy's BLAS
# threads for the cores between kernels (a multi-head attention call on 2
# threads took 9 ms spinning, 2.2 ms sleeping). The runtime reads the policy
# once, when it loads with the extension below; the variable is put back at
# once, so other OpenMP runtimes loaded later (PyTorch's own, say) see the
# user's environment. A policy the user set is kept.
#
# The same fight the other way round: after each matrix product NumPy's
# OpenBLAS threads spin for 2^28 cycles (about 0.1 s) before they sleep, so
# the attention, GELU and layer norm that follow a product in a transformer
# layer share the cores with them (on 2 threads attention took 16.8 ms after
# a product, 8.8 ms on its own). OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once,
# when NumPy first loads it: if that has not happened yet, attnkit asks for
# 2^4 cycles, sleep at once, here; if NumPy was imported first, it cannot,
# and show_config() says so. A timeout the user set is kept.
_defaults = {"OMP_WAIT_POLICY": "PASSIVE"}
if "numpy" not in _sys.modules:
    _defaults["OPENBLAS_THREAD_TIMEOUT"] = "4"
_defaults = {name: value for name, value in _defaults.items() if name not in _os.environ}
_os.environ.update(_defaults)
try:
    from . import _kernels  # noqa: E402
finally:
    for _name in _defaults:
        _os.environ.pop(_name, None)
_blas_thread_timeout = ("OPENBLAS_THREAD_TIMEOUT=4, set by attnkit" if "OPENBLAS_THREAD_TIMEOUT" in _defaults
                        else f"OPENBLAS_THREAD_TIMEOUT={_os.environ['OPENBLAS_THREAD_TIMEOUT']}"
                        if "OPENBLAS_THREAD_TIMEOUT" in _os.environ
                        else "OpenBLAS's default (NumPy was imported before attnkit)")

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
