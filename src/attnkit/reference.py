"""attnkit.reference: what every kernel computes, in plain NumPy.

This is the oracle the kernels are tested against, and the place to read the
maths without the C. Every function computes in `dtype` (float64 unless asked
otherwise: np.longdouble gives a reference for float64 kernels, np.float32
shows what a naive float32 computation gets) and returns an array of `dtype`.
Nothing here is fast, and nothing here is clever.

Shape names: x is any shape (...); a reduced axis has length C.
"""
import functools

import numpy as np

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm"]


def _ieee(func):
    """Let infinities and NaNs follow IEEE arithmetic without warnings: the
    reference must give the answer for inputs like [inf, 1], not complain."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)
    return wrapper


def _masked(x, where, dtype):
    x = np.asarray(x, dtype=dtype)                               # (...)
    if where is not None:
        x = np.where(where, x, -np.inf).astype(dtype)            # (...) masked-out -> -inf
    return x


def _shifted_exp(x, axis):
    """exp(x - max) and the max (taken as 0 for a slice with nothing in it)."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)     # (..., 1, ...) each slice's max
    m = np.where(m == -np.inf, 0, m).astype(x.dtype)             # empty slice: exp(-inf - 0) = 0
    return np.exp(x - m), m                                      # (...), every value in [0, 1]


@_ieee
def softmax(x, axis=-1, where=None, *, dtype=np.float64):
    """exp(x - max) / sum(exp(x - max)) along axis (int, tuple or None).

    Elements where `where` is False count as -inf. A slice with nothing to
    attend to gives 0; a NaN makes its slice NaN.
    """
    x = _masked(x, where, dtype)                                 # (...)
    e, _ = _shifted_exp(x, axis)                                 # (...)
    s = np.sum(e, axis=axis, keepdims=True)                      # (..., 1, ...) in [1, C], or 0
    return np.where(s == 0, 0, e / s).astype(dtype)              # (...)


@_ieee
def log_softmax(x, axis=-1, where=None, *, dtype=np.float64):
    """(x - max) - log(sum(exp(x - max))) along axis; -inf where softmax is 0."""
    x = _masked(x, where, dtype)                                 # (...)
    e, m = _shifted_exp(x, axis)                                 # (...), (..., 1, ...)
    s = np.sum(e, axis=axis, keepdims=True)                      # (..., 1, ...)
    return np.where(s == 0, -np.inf, (x - m) - np.log(s)).astype(dtype)


def _trailing_axes(x, normalized_shape):
    shape = (normalized_shape,) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    assert x.shape[x.ndim - len(shape):] == shape, (x.shape, shape)
    return tuple(range(x.ndim - len(shape), x.ndim))


@_ieee
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, dtype=np.float64):
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dimensions.

    var is the biased variance (divided by C, not C - 1), as in PyTorch.
    """
    x = np.asarray(x, dtype=dtype)                               # (..., *normalized_shape)
    axes = _trailing_axes(x, normalized_shape)
    if x.size == 0:
        return x.copy()                                          # nothing to normalise
    mean = np.mean(x, axis=axes, keepdims=True)                  # (..., 1, ..., 1)
    var = np.mean((x - mean) ** 2, axis=axes, keepdims=True)     # (..., 1, ..., 1)
    y = (x - mean) / np.sqrt(var + dtype(eps))                   # (..., *normalized_shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=dtype)                  # weight: normalized_shape
    if bias is not None:
        y = y + np.asarray(bias, dtype=dtype)                    # bias: normalized_shape
    return y.astype(dtype)


@_ieee
def rms_norm(x, normalized_shape, weight=None, eps=None, *, dtype=np.float64):
    """x / sqrt(mean(x**2) + eps) * weight over the trailing dimensions.

    eps=None is the machine epsilon of x's own dtype, as in PyTorch.
    """
    if eps is None:
        eps = np.finfo(np.asarray(x).dtype).eps
    x = np.asarray(x, dtype=dtype)                               # (..., *normalized_shape)
    axes = _trailing_axes(x, normalized_shape)
    if x.size == 0:
        return x.copy()
    mean_square = np.mean(x * x, axis=axes, keepdims=True)       # (..., 1, ..., 1)
    y = x / np.sqrt(mean_square + dtype(eps))                    # (..., *normalized_shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=dtype)
    return y.astype(dtype)
