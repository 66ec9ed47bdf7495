"""Initialisers, as torch.nn.init: each fills an array in place and returns it.

Every one draws from a NumPy Generator `rng` (a fresh one when None), so a
seeded generator gives the same weights every time. fan_in and fan_out are
PyTorch's: for a weight (out, in, *kernel), fan_in = in * prod(kernel) and
fan_out = out * prod(kernel).
"""
import math

import numpy as np

__all__ = ["calculate_gain", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
           "kaiming_normal_", "uniform_", "normal_", "zeros_", "ones_", "constant_"]


def _generator(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    return rng


def _fans(array):
    if array.ndim < 2:
        raise ValueError(f"fan in and fan out need an array of 2 or more dimensions, got "
                         f"shape {array.shape}")
    receptive = math.prod(array.shape[2:])
    return array.shape[1] * receptive, array.shape[0] * receptive


def calculate_gain(nonlinearity, param=None):
    """PyTorch's recommended gains: linear/sigmoid 1, tanh 5/3, relu sqrt(2),
    leaky_relu sqrt(2 / (1 + slope^2)), selu 3/4."""
    if nonlinearity in ("linear", "identity", "sigmoid", "conv1d", "conv2d", "conv3d"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def _fill(array, values):
    array[...] = values.astype(array.dtype, copy=False)
    return array


def uniform_(array, a=0.0, b=1.0, *, rng=None):
    return _fill(array, _generator(rng).uniform(a, b, array.shape))


def normal_(array, mean=0.0, std=1.0, *, rng=None):
    return _fill(array, _generator(rng).normal(mean, std, array.shape))


def constant_(array, value):
    array[...] = value
    return array


def zeros_(array):
    return constant_(array, 0)


def ones_(array):
    return constant_(array, 1)


def xavier_uniform_(array, gain=1.0, *, rng=None):
    """U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (Glorot and Bengio)."""
    fan_in, fan_out = _fans(array)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(array, -bound, bound, rng=rng)


def xavier_normal_(array, gain=1.0, *, rng=None):
    """N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(array)
    return normal_(array, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng=rng)


def _kaiming_std(array, a, mode, nonlinearity):
    fan_in, fan_out = _fans(array)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", *, rng=None):
    """U(-b, b), b = gain * sqrt(3 / fan) (He et al.). nn.Linear's default is
    a = sqrt(5), which makes b = 1 / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * _kaiming_std(array, a, mode, nonlinearity)
    return uniform_(array, -bound, bound, rng=rng)


def kaiming_normal_(array, a=0.0, mode="fan_in", nonlinearity="leaky_relu", *, rng=None):
    """N(0, std^2), std = gain / sqrt(fan)."""
    return normal_(array, 0.0, _kaiming_std(array, a, mode, nonlinearity), rng=rng)
