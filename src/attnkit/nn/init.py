"""Initialisers, as torch.nn.init: each fills an array in place and returns it.

Every one draws from a NumPy Generator `rng` (a fresh one when None), so a
seeded generator gives the same weights every time. fan_in and fan_out are
PyTorch's: for a weight (out, in, *kernel), fan_in = in * prod(kernel) and
fan_out = out * prod(kernel).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    _A = TypeVar("_A", bound=np.ndarray[Any, Any])
    _Rng = np.random.Generator | None

__all__ = ["calculate_gain", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
           "kaiming_normal_", "uniform_", "normal_", "zeros_", "ones_", "constant_"]


def _generator(rng: _Rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    return rng


def _fans(array: npt.NDArray[Any]) -> tuple[int, int]:
    if array.ndim < 2:
        raise ValueError(f"fan in and fan out need an array of 2 or more dimensions, got "
                         f"shape {array.shape}")
    receptive = math.prod(array.shape[2:])
    return array.shape[1] * receptive, array.shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
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


def _fill(array: _A, values: npt.NDArray[Any]) -> _A:
    array[...] = values.astype(array.dtype, copy=False)
    return array


def uniform_(array: _A, a: float = 0.0, b: float = 1.0, *, rng: _Rng = None) -> _A:
    """U(a, b) into array (any shape)."""
    return _fill(array, _generator(rng).uniform(a, b, array.shape))


def normal_(array: _A, mean: float = 0.0, std: float = 1.0, *, rng: _Rng = None) -> _A:
    """N(mean, std^2) into array (any shape)."""
    return _fill(array, _generator(rng).normal(mean, std, array.shape))


def constant_(array: _A, value: float) -> _A:
    """value into every element of array (any shape)."""
    array[...] = value
    return array


def zeros_(array: _A) -> _A:
    """0 into array (any shape)."""
    return constant_(array, 0)


def ones_(array: _A) -> _A:
    """1 into array (any shape)."""
    return constant_(array, 1)


def xavier_uniform_(array: _A, gain: float = 1.0, *, rng: _Rng = None) -> _A:
    """U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (Glorot and Bengio),
    into array (out, in, *kernel)."""
    fan_in, fan_out = _fans(array)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(array, -bound, bound, rng=rng)


def xavier_normal_(array: _A, gain: float = 1.0, *, rng: _Rng = None) -> _A:
    """N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)), into array
    (out, in, *kernel)."""
    fan_in, fan_out = _fans(array)
    return normal_(array, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng=rng)


def _kaiming_std(array: npt.NDArray[Any], a: float, mode: str, nonlinearity: str) -> float:
    fan_in, fan_out = _fans(array)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(array: _A, a: float = 0.0, mode: Literal["fan_in", "fan_out"] = "fan_in",
                     nonlinearity: str = "leaky_relu", *, rng: _Rng = None) -> _A:
    """U(-b, b), b = gain * sqrt(3 / fan) (He et al.), into array (out, in,
    *kernel). nn.Linear's default is
    a = sqrt(5), which makes b = 1 / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * _kaiming_std(array, a, mode, nonlinearity)
    return uniform_(array, -bound, bound, rng=rng)


def kaiming_normal_(array: _A, a: float = 0.0, mode: Literal["fan_in", "fan_out"] = "fan_in",
                    nonlinearity: str = "leaky_relu", *, rng: _Rng = None) -> _A:
    """N(0, std^2), std = gain / sqrt(fan), into array (out, in, *kernel)."""
    return normal_(array, 0.0, _kaiming_std(array, a, mode, nonlinearity), rng=rng)
