"""Array in, array out: softmax, log_softmax, layer_norm, rms_norm.

Each function checks its arguments (naming the problem and the shapes),
lays the data out the way the C kernel reads it, and calls the kernel. The
maths itself is in csrc/ (fast) and in attnkit.reference (plain NumPy).

Conventions, as in NumPy and PyTorch:
  - float32 and float64 in native byte order are computed in their own
    precision and returned in it; other dtypes are refused (TypeError).
  - Inputs are never modified. `out=` may be the input itself.
  - Any strides, negative ones included, are accepted; when the kernel cannot
    read an array in place it reads a contiguous copy.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, overload

import numpy as np
from numpy.lib.array_utils import normalize_axis_index, normalize_axis_tuple

from . import _kernels

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    # what the functions return: float32 or float64, the input's dtype
    _Float = npt.NDArray[np.floating]
    _Axis = SupportsIndex | Sequence[SupportsIndex] | None
    _Shape = SupportsIndex | Sequence[SupportsIndex]
    _Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "batch_norm",
           "scaled_dot_product_attention", "linear", "linear_backward", "relu", "gelu", "silu", "sigmoid", "dropout",
           "softmax_backward", "log_softmax_backward", "layer_norm_backward", "rms_norm_backward",
           "relu_backward", "gelu_backward", "silu_backward", "bias_activation_backward"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # native byte order
_MACHINE_EPSILON = {"f": float(np.finfo(np.float32).eps), "d": float(np.finfo(np.float64).eps)}


# ---------------------------------------------------------------------------
# Checks shared by every function

def _as_float_array(x: npt.ArrayLike, func: str, name: str = "x") -> _Array:
    """x as an ndarray of native float32/float64; TypeError otherwise."""
    a = np.asarray(x)
    if a.dtype in _FLOAT_DTYPES:
        return a
    if a.dtype.newbyteorder("=") in _FLOAT_DTYPES:
        raise TypeError(
            f"{func}: {name} has non-native byte order ({a.dtype.str}, shape {a.shape}); "
            f"convert it with {name}.astype({name}.dtype.newbyteorder('='))"
        )
    raise TypeError(
        f"{func}: {name} must be a float32 or float64 array, got dtype {a.dtype} "
        f"(shape {a.shape}); convert it with {name}.astype(np.float32)"
    )


def _contiguous(a: _Array) -> _Array:
    """a itself when C-contiguous and aligned (what the kernels read), else a
    fresh copy, which is both. Unlike np.ascontiguousarray, keeps a 0-d array
    0-d and does not pass an unaligned array through."""
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, order="C", copy=True)


def _flag(value: object, func: str, name: str) -> bool:
    """A bool argument: True, False or NumPy's bools. Anything else (a string,
    an int, an array) is a TypeError: `is_causal="no"` must not mean True."""
    if value is False or value is True:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{func}: {name} must be a bool, got {type(value).__name__} {value!r}")


def _real(value: object, func: str, name: str) -> float:
    """A real-number argument as a Python float. Strings are refused (NumPy
    and float() would parse "1e-5"), and so are bools and complex numbers."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{func}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _index(value: Any, func: str, name: str) -> int:
    """An integer argument (an axis, a dimension); bools are refused, since
    True would silently mean 1."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{func}: {name} must be an int, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{func}: {name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_out(out: object, x: _Array, func: str) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{func}: out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != x.dtype or not out.dtype.isnative:
        raise TypeError(f"{func}: out has dtype {out.dtype} but the result is {x.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"{func}: out has shape {out.shape} but the result has shape {x.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{func}: out (shape {out.shape}) is read-only")


def _data_address(a):
    return a.__array_interface__["data"][0]


def _same_layout(a, b):
    return _data_address(a) == _data_address(b) and a.strides == b.strides


def _readable_as(x: _Array, shape: tuple[int, ...], unit_axis: int) -> _Array:
    """x reshaped to `shape` without a copy if possible, with unit stride along
    `unit_axis` (when that axis has more than one element) and aligned;
    otherwise a C-contiguous copy of it. Never changes x."""
    try:
        v = x.reshape(shape, copy=False)
    except ValueError:
        return np.ascontiguousarray(x).reshape(shape)
    if (shape[unit_axis] > 1 and v.strides[unit_axis] != v.itemsize) or not v.flags.aligned:
        return np.array(v, order="C", copy=True)
    return v


def _writable_as(out, shape, unit_axis, *inputs):
    """out reshaped to `shape` so the kernel can write it directly, or None when
    it cannot: a copy would be needed, the layout is not one the kernel
    writes, or out overlaps an input in any other way than being it."""
    try:
        v = out.reshape(shape, copy=False)
    except ValueError:
        return None
    if (shape[unit_axis] > 1 and v.strides[unit_axis] != v.itemsize) or not v.flags.aligned:
        return None
    for a in inputs:
        if a is not None and np.may_share_memory(v, a) and not (
            a.dtype == v.dtype and _same_layout(v, a)
        ):
            return None
    return v


def _run_into(out: _Array | None, shape: tuple[int, ...], unit_axis: int,
              inputs: tuple[_Array | None, ...], result_shape: tuple[int, ...],
              result_dtype: np.dtype[Any], kernel: Callable[[_Array], object]) -> _Array:
    """Call kernel(dest) on an array `dest` of `shape` that is: a fresh array
    when out is None; a view of `out` when the kernel can write it in place;
    otherwise a temporary, copied into out afterwards. Returns the user's
    result: out itself, or the fresh array shaped `result_shape`."""
    if out is None:
        dest = np.empty(shape, dtype=result_dtype)
        kernel(dest)
        return dest.reshape(result_shape)
    view = _writable_as(out, shape, unit_axis, *inputs)
    if view is not None:
        kernel(view)
        return out
    tmp = np.empty(shape, dtype=result_dtype)
    kernel(tmp)
    out[...] = tmp.reshape(out.shape)
    return out


# ---------------------------------------------------------------------------
# softmax and log_softmax

def _normalize_axes(axis: _Axis, ndim: int, func: str) -> tuple[int, ...]:
    """Sorted tuple of the axes to reduce over; AxisError or TypeError."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = normalize_axis_tuple(tuple(_index(a, func, "axis") for a in axis), ndim)
        return tuple(sorted(axes))
    return (normalize_axis_index(_index(axis, func, "axis"), ndim),)


def _gradient_for(grad, a, func, what):
    """grad, the gradient of `a` (described as `what` in errors), as a float
    array of a's shape and dtype."""
    dy = _as_float_array(grad, func, "grad")
    if dy.shape != a.shape:
        raise ValueError(f"{func}: grad has shape {dy.shape} but {what} has shape {a.shape}")
    if dy.dtype != a.dtype:
        raise TypeError(f"{func}: grad has dtype {dy.dtype} but {what} is {a.dtype}")
    return dy


def _where_mask(where, shape, func, name):
    """softmax's where= mask: bool, broadcast (not copied) to `shape`."""
    where = np.asarray(where)
    if where.dtype != np.bool_:
        raise TypeError(f"{func}: where must be a bool array, got dtype {where.dtype} "
                        f"(shape {where.shape})")
    try:
        return np.broadcast_to(where, shape)
    except ValueError:
        raise ValueError(f"{func}: where of shape {where.shape} does not broadcast to "
                         f"the shape of {name}, {shape}") from None


def _softmax(x, axis, where, out, log, func):
    x = _as_float_array(x, func)
    axes = _normalize_axes(axis, x.ndim, func)
    if where is not None:
        where = _where_mask(where, x.shape, func, "x")
    if out is not None:
        _check_out(out, x, func)
    return _along_axes((x,), where, axes, out,
                       lambda dest, x3, where3: _kernels.softmax(dest, x3, where3, log))


def _along_axes(inputs, where, axes, out, kernel):
    """kernel(dest, *inputs3, where3) over the (N, C, K) layout of the
    same-shaped checked `inputs`, C being the reduced `axes` (normalized,
    sorted): softmax and its backward. Reduced axes that are not next to each
    other are first moved to the end. Returns out, or a new array."""
    x = inputs[0]
    if x.size == 0:
        return out if out is not None else np.empty(x.shape, x.dtype)
    if axes and axes != tuple(range(axes[0], axes[-1] + 1)):
        moved = tuple(range(x.ndim - len(axes), x.ndim))
        result = _along_axes(tuple(np.moveaxis(a, axes, moved) for a in inputs),
                             None if where is None else np.moveaxis(where, axes, moved), moved, None, kernel)
        result = np.moveaxis(result, moved, axes)
        if out is None:
            return np.ascontiguousarray(result)
        out[...] = result
        return out
    if axes:
        first, last = axes[0], axes[-1] + 1
    else:  # axis=(): every element is a slice of its own
        first = last = x.ndim
    shape3 = (math.prod(x.shape[:first]), math.prod(x.shape[first:last]),
              math.prod(x.shape[last:]))
    unit_axis = 1 if shape3[2] == 1 else 2
    inputs3 = tuple(_readable_as(a, shape3, unit_axis) for a in inputs)
    where3 = None if where is None else where.reshape(shape3)
    return _run_into(out, shape3, unit_axis, inputs3 + (where3,), x.shape, x.dtype,
                     lambda dest: kernel(dest, *inputs3, where3))


def softmax(x: npt.ArrayLike, axis: _Axis = -1, *, where: npt.ArrayLike | None = None,
            out: _Float | None = None) -> _Float:
    """Softmax along `axis`: exp(x - max) / sum(exp(x - max)).

    Parameters
    ----------
    x : array_like (...), any shape, float32 or float64
    axis : int, tuple of ints or None
        The axis (or axes, or all axes for None) each softmax runs over.
    where : array_like of bool, optional
        Broadcast to x's shape. Elements where it is False take no part: they
        get probability 0, as if they were -inf.
    out : ndarray, optional
        Where to write the result (same shape and dtype as x; may be x).

    Returns
    -------
    ndarray of x's shape and dtype. Each slice sums to 1, however large the
    logits. A slice with nothing to attend to (all -inf, or all masked out)
    gives 0 everywhere, never NaN; a NaN in a slice gives NaN in that slice.
    """
    if where is None and out is None and type(axis) is int and axis == -1:
        result = _kernels.softmax_last_axis(x, False)
        if result is not None:
            return result
    return _softmax(x, axis, where, out, False, "softmax")


def log_softmax(x: npt.ArrayLike, axis: _Axis = -1, *, where: npt.ArrayLike | None = None,
                out: _Float | None = None) -> _Float:
    """Log of the softmax along `axis`: (x - max) - log(sum(exp(x - max))).

    Same arguments as `softmax`. Masked-out elements, and every element of a
    slice with nothing to attend to, give -inf; a NaN gives a NaN slice.
    Computed directly, not as log(softmax(x)), so that very negative
    log-probabilities keep their precision instead of underflowing to -inf.
    """
    if where is None and out is None and type(axis) is int and axis == -1:
        result = _kernels.softmax_last_axis(x, True)
        if result is not None:
            return result
    return _softmax(x, axis, where, out, True, "log_softmax")


def _softmax_backward(grad, y, axis, where, out, log, func):
    y = _as_float_array(y, func, "output")
    dy = _gradient_for(grad, y, func, "the output y")
    axes = _normalize_axes(axis, y.ndim, func)
    if where is not None:
        where = _where_mask(where, y.shape, func, "y")
    if out is not None:
        _check_out(out, y, func)
    return _along_axes((dy, y), where, axes, out,
                       lambda dest, dy3, y3, where3: _kernels.softmax_backward(dest, dy3, y3, where3, log))


def softmax_backward(grad: npt.ArrayLike, y: npt.ArrayLike, axis: _Axis = -1, *,
                     where: npt.ArrayLike | None = None, out: _Float | None = None) -> _Float:
    """The gradient of softmax: given y = softmax(x, axis, where=where) and
    grad = dLoss/dy, returns dLoss/dx = y * (grad - sum(grad * y)), the sum
    over each slice's kept elements, of y's shape (...).

    grad (...) and y (...) have one shape and dtype; axis and where are the forward's
    (where broadcast to y's shape). Masked-out elements, and slices with
    nothing kept, get 0, never NaN. out: as for softmax (may be grad or y).
    torch's counterpart is torch.ops.aten._softmax_backward_data.
    """
    if where is None and out is None and type(axis) is int and axis == -1:
        result = _kernels.softmax_backward_last_axis(grad, y, False)
        if result is not None:
            return result
    return _softmax_backward(grad, y, axis, where, out, False, "softmax_backward")


def log_softmax_backward(grad: npt.ArrayLike, y: npt.ArrayLike, axis: _Axis = -1, *,
                         where: npt.ArrayLike | None = None, out: _Float | None = None) -> _Float:
    """The gradient of log_softmax: given y = log_softmax(x, axis, where=where)
    and grad = dLoss/dy, returns grad - exp(y) * sum(grad), the sum over each
    slice's kept elements.

    Same arguments as softmax_backward. Masked-out elements, and slices with
    nothing kept (where the forward gave -inf throughout), get 0, never NaN.
    """
    if where is None and out is None and type(axis) is int and axis == -1:
        result = _kernels.softmax_backward_last_axis(grad, y, True)
        if result is not None:
            return result
    return _softmax_backward(grad, y, axis, where, out, True, "log_softmax_backward")


# ---------------------------------------------------------------------------
# layer_norm and rms_norm

def _shape_tuple(value: _Shape, func: str, name: str) -> tuple[int, ...]:
    """An int, or a tuple or list of ints, as a tuple of ints (bools refused)."""
    dims = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(d, (bool, np.bool_)) or not hasattr(d, "__index__") for d in dims):
        raise TypeError(f"{func}: {name} must be an int or a tuple of ints, got {value!r}")
    return tuple(operator.index(d) for d in dims)


def _normalized_shape(normalized_shape: _Shape, x: _Array, func: str) -> tuple[int, ...]:
    shape = _shape_tuple(normalized_shape, func, "normalized_shape")
    if any(d < 0 for d in shape):
        raise ValueError(f"{func}: normalized_shape {shape} has a negative dimension")
    if len(shape) > x.ndim or x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(f"{func}: normalized_shape {shape} does not match the trailing "
                         f"dimensions of the input, whose shape is {x.shape}")
    return shape


def _parameter(p: npt.ArrayLike | None, shape: tuple[int, ...], dtype: np.dtype[Any], func: str,
               name: str) -> _Array | None:
    """weight/bias as a contiguous vector of x's dtype, or None."""
    if p is None:
        return None
    a = np.asarray(p)
    if a.dtype != dtype or not a.dtype.isnative:
        raise TypeError(f"{func}: {name} has dtype {a.dtype} but the input is {dtype}; "
                        f"convert it with {name}.astype(np.{dtype})")
    if a.shape != shape:
        raise ValueError(f"{func}: {name} has shape {a.shape} but normalized_shape is {shape}")
    return _contiguous(a).reshape(-1)


def _check_eps(eps: object, func: str) -> float:
    value = _real(eps, func, "eps")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{func}: eps must be finite and >= 0, got {eps!r}")
    return value


def _rows(x: _Array, normalized_shape: tuple[int, ...], out: _Array | None,
          func: str) -> tuple[tuple[int, int], _Array]:
    """x as (N, C) rows with C the normalized size, and the out check."""
    if out is not None:
        _check_out(out, x, func)
    C = math.prod(normalized_shape)
    N = math.prod(x.shape[: x.ndim - len(normalized_shape)])
    return (N, C), _readable_as(x, (N, C), 1)


@overload
def layer_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
               bias: npt.ArrayLike | None = None, eps: float = 1e-5, *, out: _Float | None = None,
               return_stats: Literal[False] = False) -> _Float: ...
@overload
def layer_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
               bias: npt.ArrayLike | None = None, eps: float = 1e-5, *, out: _Float | None = None,
               return_stats: Literal[True]) -> tuple[_Float, _Float, _Float]: ...
@overload
def layer_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
               bias: npt.ArrayLike | None = None, eps: float = 1e-5, *, out: _Float | None = None,
               return_stats: bool = False) -> _Float | tuple[_Float, _Float, _Float]: ...
def layer_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
               bias: npt.ArrayLike | None = None, eps: float = 1e-5, *, out: _Float | None = None,
               return_stats: bool = False) -> _Float | tuple[_Float, _Float, _Float]:
    """Layer normalisation over the trailing `normalized_shape` dimensions.

    out = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and the
    biased variance taken over the last len(normalized_shape) dimensions, as
    in torch.nn.functional.layer_norm.

    Parameters
    ----------
    x : array_like, float32 or float64, shape (..., *normalized_shape)
    normalized_shape : int or tuple of ints
    weight, bias : array_like of shape normalized_shape and x's dtype, optional
    eps : float >= 0, added to the variance
    out : ndarray, optional (x's shape and dtype; may be x)
    return_stats : bool
        True returns (out, mean, rstd), what layer_norm_backward needs: each
        row's mean and 1/sqrt(var + eps), of shape x.shape[:-k] + (1,) * k
        (k = len(normalized_shape)) and x's dtype, as
        torch.ops.aten.native_layer_norm gives them.
    """
    if out is None and type(eps) is float and return_stats is False:
        result = _kernels.norm_last_axis(x, normalized_shape, weight, bias, eps, False)
        if result is not None:
            return result
    func = "layer_norm"
    return_stats = _flag(return_stats, func, "return_stats")
    x = _as_float_array(x, func, "input")
    shape = _normalized_shape(normalized_shape, x, func)
    w = _parameter(weight, shape, x.dtype, func, "weight")
    b = _parameter(bias, shape, x.dtype, func, "bias")
    eps = _check_eps(eps, func)
    shape2, x2 = _rows(x, shape, out, func)
    mean, rstd = _new_stats(shape2, x.dtype, return_stats, 0.0)
    result = _run_into(out, shape2, 1, (x2, w, b), x.shape, x.dtype,
                       lambda dest: _kernels.layer_norm(dest, mean, rstd, x2, w, b, eps))
    if not return_stats:
        return result
    return result, _stats_shaped(mean, x, shape), _stats_shaped(rstd, x, shape)


def _new_stats(shape2: tuple[int, int], dtype: np.dtype[Any], wanted: bool,
               empty_mean: float) -> tuple[Any, Any]:
    """(mean, rstd) vectors of N for the kernel to fill, or (None, None). A row
    of no elements (C = 0) is not written by the kernel: it gets PyTorch's
    mean 0 and rstd NaN."""
    if not wanted:
        return None, None
    N, C = shape2
    if C == 0:
        return np.full(N, empty_mean, dtype), np.full(N, np.nan, dtype)
    return np.empty(N, dtype), np.empty(N, dtype)


def _stats_shaped(stat: _Array, x: _Array, normalized_shape: tuple[int, ...]) -> _Array:
    k = len(normalized_shape)
    return stat.reshape(x.shape[: x.ndim - k] + (1,) * k)


@overload
def rms_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
             eps: float | None = None, *, out: _Float | None = None,
             return_stats: Literal[False] = False) -> _Float: ...
@overload
def rms_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
             eps: float | None = None, *, out: _Float | None = None,
             return_stats: Literal[True]) -> tuple[_Float, _Float]: ...
@overload
def rms_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
             eps: float | None = None, *, out: _Float | None = None,
             return_stats: bool = False) -> _Float | tuple[_Float, _Float]: ...
def rms_norm(x: npt.ArrayLike, normalized_shape: _Shape, weight: npt.ArrayLike | None = None,
             eps: float | None = None, *, out: _Float | None = None,
             return_stats: bool = False) -> _Float | tuple[_Float, _Float]:
    """Root-mean-square normalisation over the trailing `normalized_shape` dimensions.

    x (..., *normalized_shape), float32 or float64; weight of shape
    normalized_shape, or None; out, if given, x's shape and dtype (may be x).
    out = x / sqrt(mean(x**2) + eps) * weight, as torch.nn.functional.rms_norm;
    eps=None means the machine epsilon of x's dtype. return_stats=True
    returns (out, rstd), rstd = 1/sqrt(mean(x**2) + eps) of shape
    x.shape[:-k] + (1,) * k, what rms_norm_backward needs.
    """
    if out is None and (eps is None or type(eps) is float) and type(x) is np.ndarray \
            and return_stats is False:
        eps_value = eps if eps is not None else _MACHINE_EPSILON.get(x.dtype.char)
        if eps_value is not None:
            result = _kernels.norm_last_axis(x, normalized_shape, weight, None, eps_value, True)
            if result is not None:
                return result
    func = "rms_norm"
    return_stats = _flag(return_stats, func, "return_stats")
    x = _as_float_array(x, func, "input")
    shape = _normalized_shape(normalized_shape, x, func)
    w = _parameter(weight, shape, x.dtype, func, "weight")
    eps = float(np.finfo(x.dtype).eps) if eps is None else _check_eps(eps, func)
    shape2, x2 = _rows(x, shape, out, func)
    _, rstd = _new_stats(shape2, x.dtype, return_stats, 0.0)
    result = _run_into(out, shape2, 1, (x2, w), x.shape, x.dtype,
                       lambda dest: _kernels.rms_norm(dest, rstd, x2, w, eps))
    if not return_stats:
        return result
    return result, _stats_shaped(rstd, x, shape)


def _norm_backward_operands(grad, x, stats, normalized_shape, weight, func):
    """Checked (N, C) rows of grad and x, the statistics as (N) vectors, the
    weight as a (C) vector or None, and the normalized shape."""
    x = _as_float_array(x, func, "input")
    dy = _gradient_for(grad, x, func, "the input")
    shape = _normalized_shape(normalized_shape, x, func)
    w = _parameter(weight, shape, x.dtype, func, "weight")
    lead = x.shape[: x.ndim - len(shape)]
    expected = lead + (1,) * len(shape)
    vectors = []
    for name, stat in stats:
        a = _as_float_array(stat, func, name)
        if a.shape != expected and a.shape != lead:
            raise ValueError(f"{func}: {name} has shape {a.shape}, expected {expected} for input "
                             f"{x.shape} and normalized_shape {shape}")
        if a.dtype != x.dtype:
            raise TypeError(f"{func}: {name} has dtype {a.dtype} but the input is {x.dtype}")
        vectors.append(_contiguous(a).reshape(-1))
    (N, C), x2 = _rows(x, shape, None, func)
    return _readable_as(dy, (N, C), 1), x2, vectors, w, shape


def layer_norm_backward(grad: npt.ArrayLike, x: npt.ArrayLike, mean: npt.ArrayLike,
                        rstd: npt.ArrayLike, normalized_shape: _Shape,
                        weight: npt.ArrayLike | None = None) -> tuple[_Float, _Float, _Float]:
    """The gradients of layer_norm, from what layer_norm(..., return_stats=True) saved.

    grad = dLoss/dout and x, the forward's input, have one shape (...,
    *normalized_shape) and dtype;
    mean and rstd are the forward's statistics (shape x.shape[:-k] + (1,) * k,
    or x.shape[:-k]); weight is the forward's (None for none). Returns
    (dx, dweight, dbias), dweight and dbias of normalized_shape's shape,
    always (for weight None, the gradient of a weight of ones):

      xhat = (x - mean) * rstd,  g = grad * weight   (per row of C elements)
      dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
      dweight = sum over rows of grad * xhat
      dbias   = sum over rows of grad

    As torch.ops.aten.native_layer_norm_backward. Row sums are in double;
    the sums over rows in an order fixed by the shapes, so results are
    bitwise the same at any thread count.
    """
    result = _kernels.norm_backward_last_axis(grad, x, mean, rstd, normalized_shape, weight)
    if result is not None:
        return result
    func = "layer_norm_backward"
    dy2, x2, (m, r), w, shape = _norm_backward_operands(
        grad, x, (("mean", mean), ("rstd", rstd)), normalized_shape, weight, func)
    dx = np.empty(x2.shape, x2.dtype)
    dw = np.zeros(x2.shape[1], x2.dtype)
    db = np.zeros(x2.shape[1], x2.dtype)
    _kernels.norm_backward(dx, dw, db, dy2, m, r, x2, w)
    return dx.reshape(np.shape(x)), dw.reshape(shape), db.reshape(shape)


def rms_norm_backward(grad: npt.ArrayLike, x: npt.ArrayLike, rstd: npt.ArrayLike,
                      normalized_shape: _Shape,
                      weight: npt.ArrayLike | None = None) -> tuple[_Float, _Float]:
    """The gradients of rms_norm, from what rms_norm(..., return_stats=True) saved.

    grad and x (..., *normalized_shape) as for layer_norm_backward; rstd the
    forward's (x.shape[:-k] + (1,) * k, or x.shape[:-k]); weight of shape
    normalized_shape, or None. Returns (dx, dweight), dx of x's shape,
    dweight of normalized_shape's shape, always:

      xhat = x * rstd,  g = grad * weight
      dx      = rstd * (g - xhat * mean(g * xhat))
      dweight = sum over rows of grad * xhat
    """
    result = _kernels.norm_backward_last_axis(grad, x, None, rstd, normalized_shape, weight)
    if result is not None:
        return result
    func = "rms_norm_backward"
    dy2, x2, (r,), w, shape = _norm_backward_operands(grad, x, (("rstd", rstd),), normalized_shape,
                                                      weight, func)
    dx = np.empty(x2.shape, x2.dtype)
    dw = np.zeros(x2.shape[1], x2.dtype)
    _kernels.norm_backward(dx, dw, None, dy2, None, r, x2, w)
    return dx.reshape(np.shape(x)), dw.reshape(shape)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention

def _attention_operand(a, shape):
    """a broadcast to `shape`, with its last axis one the kernel can read in
    place (a copy only when it is not)."""
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize or not a.flags.aligned:
        a = np.array(a, order="C", copy=True)
    return a if a.shape == shape else np.broadcast_to(a, shape)


def _zero_column(a: _Array) -> _Array:
    """a (..., 0) as (..., 1) zeros, a broadcast view: no memory."""
    return np.broadcast_to(np.zeros(1, a.dtype), a.shape[:-1] + (1,))


def _broadcast(shapes, func, what):
    """NumPy's broadcast of shape tuples (np.broadcast_shapes allocates arrays
    to find it, several microseconds; a small attention call is ten)."""
    if shapes[0] == shapes[1] == shapes[2]:
        return shapes[0]
    ndim = max(len(s) for s in shapes)
    result = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            listed = ", ".join(str(s) for s in shapes)
            raise ValueError(f"{func}: the {what} of query, key and value do not broadcast: "
                             f"{listed}")
        result.append(sizes.pop() if sizes else 1)
    return tuple(result)


def _attention_mask(attn_mask, q, full_shape, func):
    """The mask broadcast to (*batch, H, L, S), bool or of q's dtype, with its
    last axis contiguous or broadcast; never copied to the full shape."""
    mask = np.asarray(attn_mask)
    if mask.dtype == np.bool_:
        pass
    elif mask.dtype.kind == "f" and mask.dtype.itemsize in (4, 8):
        mask = mask.astype(q.dtype, copy=False)
    else:
        raise TypeError(f"{func}: attn_mask must be bool (True = attend) or float (added to the "
                        f"scores), got dtype {mask.dtype} (shape {mask.shape})")
    try:
        full = np.broadcast_to(mask, full_shape)
    except ValueError:
        raise ValueError(f"{func}: attn_mask of shape {mask.shape} does not broadcast to the "
                         f"scores' shape {full_shape} (..., H, L, S)") from None
    if full_shape[-1] > 1 and full.strides[-1] not in (0, full.itemsize) or not full.flags.aligned:
        full = np.broadcast_to(np.array(mask, order="C", copy=True), full_shape)
    return full


class _AttentionProblem:
    """What scaled_dot_product_attention and its backward read from their
    arguments: the checked arrays and the sizes of the broadcast problem."""
    __slots__ = ("q", "k", "v", "batch", "H", "Hkv", "L", "S", "E", "Ev", "two_d", "scale",
                 "dropout_p", "is_causal", "offset")
    q: _Array
    k: _Array
    v: _Array
    batch: tuple[int, ...]
    H: int
    Hkv: int
    L: int
    S: int
    E: int
    Ev: int
    two_d: bool
    scale: float
    dropout_p: float
    is_causal: bool
    offset: int


def _attention_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                       causal_alignment, func):
    q = _as_float_array(query, func, "query")
    k = _as_float_array(key, func, "key")
    v = _as_float_array(value, func, "value")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{func}: query, key and value must share a dtype, got {q.dtype}, "
                        f"{k.dtype} and {v.dtype}")
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim < 2:
            raise ValueError(f"{func}: {name} needs at least 2 dimensions (L, E), got shape {a.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{func}: query's last dimension ({q.shape[-1]}) differs from key's "
                         f"({k.shape[-1]}): query {q.shape}, key {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{func}: key and value have different lengths S: key {k.shape}, "
                         f"value {v.shape}")
    is_causal = _flag(is_causal, func, "is_causal")
    enable_gqa = _flag(enable_gqa, func, "enable_gqa")
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"{func}: causal_alignment must be 'top_left' or 'bottom_right', "
                         f"got {causal_alignment!r}")
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    two_d = q.ndim == 2 and k.ndim == 2 and v.ndim == 2
    if enable_gqa:
        if min(q.ndim, k.ndim, v.ndim) < 3:
            raise ValueError(f"{func}: enable_gqa needs a head dimension: query {q.shape}, "
                             f"key {k.shape}, value {v.shape}")
        H, Hkv = q.shape[-3], k.shape[-3]
        if v.shape[-3] != Hkv:
            raise ValueError(f"{func}: key and value have different head counts: key {k.shape}, "
                             f"value {v.shape}")
        if (H % Hkv != 0) if Hkv else H != 0:
            raise ValueError(f"{func}: with enable_gqa, the query heads ({H}) must be a multiple "
                             f"of the key/value heads ({Hkv})")
        batch = _broadcast([q.shape[:-3], k.shape[:-3], v.shape[:-3]], func, "batch dimensions")
    else:
        if k.ndim >= 3 and q.ndim >= 3 and k.shape[-3] not in (1, q.shape[-3]) and q.shape[-3] != 1:
            raise ValueError(f"{func}: query has {q.shape[-3]} heads but key has {k.shape[-3]}; "
                             "pass enable_gqa=True for grouped-query attention")
        lead = _broadcast([q.shape[:-2], k.shape[:-2], v.shape[:-2]], func, "leading dimensions")
        lead = lead or (1,)
        batch, H = lead[:-1], lead[-1]
        Hkv = H
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else _real(scale, func, "scale")
    dropout_p = _real(dropout_p, func, "dropout_p")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{func}: dropout_p must be in [0, 1], got {dropout_p}")
    p = _AttentionProblem()
    p.q, p.k, p.v, p.batch, p.H, p.Hkv, p.L, p.S, p.E, p.Ev = q, k, v, batch, H, Hkv, L, S, E, Ev
    p.two_d, p.scale, p.dropout_p, p.is_causal = two_d, scale, dropout_p, is_causal
    p.offset = 0 if causal_alignment == "top_left" else S - L
    return p


def _dropout_seed(seed: object, func: str) -> int:
    """The seed that fixes which weights dropout drops: an int in [0, 2**32)."""
    seed = _index(seed, func, "dropout_seed")
    if not 0 <= seed < 2**32:
        raise ValueError(f"{func}: dropout_seed must be in [0, 2**32), got {seed}")
    return seed


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: Literal[False] = False, return_lse: Literal[False] = False,
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> _Float: ...
@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: Literal[False] = False, return_lse: Literal[True],
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> tuple[_Float, _Float]: ...
@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: Literal[True, "mean"], return_lse: Literal[False] = False,
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> tuple[_Float, _Float]: ...
@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: Literal[True, "mean"], return_lse: Literal[True],
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> tuple[_Float, _Float, _Float]: ...
@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: bool | Literal["mean"] = False, return_lse: bool = False,
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> _Float | tuple[_Float, ...]: ...
def scaled_dot_product_attention(
    query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
    scale: float | None = None, enable_gqa: bool = False,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    return_weights: bool | Literal["mean"] = False, return_lse: bool = False,
    rng: np.random.Generator | None = None, dropout_seed: int | None = None,
) -> _Float | tuple[_Float, ...]:
    """Attention: softmax(query @ key^T * scale + mask) @ value, fused.

    Semantics and argument names are PyTorch's F.scaled_dot_product_attention;
    the (L, S) matrix of scores is never stored, unless the weights are asked for.

    Parameters
    ----------
    query : (..., H, L, E) array, float32 or float64
    key : (..., Hkv, S, E) array of the same dtype
    value : (..., Hkv, S, Ev) array of the same dtype; Ev may differ from E
        The leading dimensions broadcast against each other (and, without
        enable_gqa, the head dimension too). 2-d inputs (L, E) work as one head.
    attn_mask : array broadcastable to (..., H, L, S), optional
        bool: True where attention is allowed (note: the opposite of
        MultiHeadAttention's key_padding_mask, where True means ignore);
        float: added to the scores (-inf hides a key). Broadcast, not copied.
    dropout_p : float in [0, 1]
        Drops weights with this probability and scales the rest by 1/(1-p).
        Which weights are dropped is a hash of their position and a seed:
        `dropout_seed` (an int in [0, 2**32)) if given, else one drawn from
        `rng` (a NumPy Generator; a seeded one reproduces the result). To
        train, draw the seed yourself and give the same one to
        scaled_dot_product_attention_backward, which drops the same weights.
    is_causal : bool
        Hide the keys after each query. causal_alignment="top_left" (PyTorch's
        default) lets query i see keys 0..i; "bottom_right" puts the queries
        at the end of the keys, query i at position S - L + i, as in decoding
        with a cache. May be combined with attn_mask.
    scale : float, optional
        Default 1/sqrt(E).
    enable_gqa : bool
        Grouped-query attention: H a multiple of Hkv, query head h uses
        key/value head h // (H // Hkv).
    return_weights : bool or "mean"
        Also return the weights that multiplied value, (..., H, L, S),
        dropout included; "mean" returns them averaged over the heads,
        (..., L, S), as MultiheadAttention does (without the per-head array
        ever reaching Python).
    return_lse : bool
        Also return each row's log-sum-exp of its scores, (..., H, L).

    Returns
    -------
    output (..., H, L, Ev); or (output, weights), (output, lse) or
    (output, weights, lse) as asked. A query with nothing to attend to (all
    keys masked) gets output 0, weights 0 and lse -inf, never NaN.
    """
    func = "scaled_dot_product_attention"
    return_lse = _flag(return_lse, func, "return_lse")
    mean_weights = isinstance(return_weights, str) and return_weights == "mean"
    if isinstance(return_weights, str) and not mean_weights:
        raise ValueError(f"{func}: return_weights must be True, False or 'mean', got {return_weights!r}")
    if not mean_weights:
        return_weights = _flag(return_weights, func, "return_weights")
    p = _attention_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           causal_alignment, func)
    q, k, v, batch, H, Hkv, L, S, E, Ev = p.q, p.k, p.v, p.batch, p.H, p.Hkv, p.L, p.S, p.E, p.Ev
    two_d, scale, dropout_p, is_causal = p.two_d, p.scale, p.dropout_p, p.is_causal
    seed = 0
    if dropout_p > 0:
        if dropout_seed is not None:
            if rng is not None:
                raise ValueError(f"{func}: pass rng or dropout_seed, not both")
            seed = _dropout_seed(dropout_seed, func)
        else:
            seed = _draw_dropout_seed(rng, func)

    want_weights = mean_weights or return_weights
    # The kernel works on E, Ev >= 1. With E = 0 every score is an empty dot
    # product, 0, which a zero column gives too; with Ev = 0 the output is
    # empty but the weights and lse are not, and a zero column of values
    # lets the kernel compute them.
    if E == 0:
        q, k, E = _zero_column(q), _zero_column(k), 1
    Ev_kernel = Ev
    if Ev == 0 and (want_weights or return_lse):
        v, Ev_kernel = _zero_column(v), 1
    q4 = _attention_operand(q, batch + (H, L, E))
    k4 = _attention_operand(k, batch + (Hkv, S, E))
    v4 = _attention_operand(v, batch + (Hkv, S, Ev_kernel))
    mask4 = None if attn_mask is None else _attention_mask(attn_mask, q, batch + (H, L, S), func)
    out = np.empty(batch + (H, L, Ev_kernel), q.dtype)
    lse = np.empty(batch + (H, L), q.dtype) if return_lse else None
    weights = np.empty(batch + (H, L, S), q.dtype) if want_weights else None
    mean = np.empty(batch + (L, S), q.dtype) if mean_weights else None
    _kernels.attention(out, lse, weights, q4, k4, v4, mask4, scale, is_causal, p.offset,
                       dropout_p, seed, mean)
    if Ev_kernel != Ev:
        out = np.empty(out.shape[:-1] + (0,), q.dtype)
    if two_d:   # the 2-d call ran as one head: drop that axis (the mean has none)
        out = out[0]
        lse = None if lse is None else lse[0]
        weights = None if weights is None else weights[0]
    if mean is not None:
        weights = mean
    results: tuple[Any, ...] = (out,) + ((weights,) if want_weights else ()) + ((lse,) if return_lse else ())
    return results[0] if len(results) == 1 else results


def _sum_to_shape(grad: _Array, shape: tuple[int, ...]) -> _Array:
    """grad summed over the dimensions it was broadcast along to reach shape
    (autograd's rule for a broadcast input)."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + d for d, n in enumerate(shape)
                                      if n == 1 and grad.shape[lead + d] != 1)
    return np.ascontiguousarray(grad.sum(axis=axes).reshape(shape))


def _saved(a: npt.ArrayLike, shape: tuple[int, ...], dtype: np.dtype[Any], func: str,
           name: str) -> _Array:
    """A forward result handed back to the backward: the forward's shape and
    dtype, read as a C-contiguous array (a copy only when it is not)."""
    a = _as_float_array(a, func, name)
    if a.dtype != dtype:
        raise TypeError(f"{func}: {name} must have the query's dtype {dtype}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{func}: {name} has shape {a.shape}, expected {shape} (the forward's)")
    return np.ascontiguousarray(a)


def scaled_dot_product_attention_backward(
    grad_out: npt.ArrayLike, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
    out: npt.ArrayLike, lse: npt.ArrayLike, attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
    enable_gqa: bool = False, causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    dropout_seed: int | None = None,
) -> tuple[_Float, _Float, _Float]:
    """The gradients of scaled_dot_product_attention: (dq, dk, dv).

    Takes the forward's arguments (the same broadcasting rules, mask, scale,
    causal alignment and GQA), the gradient of its output, and what it
    returned: `out` and `lse` (call the forward with return_lse=True). The
    weights are recomputed from lse a tile at a time (FlashAttention-2's
    backward), so memory stays O(threads x tile) beyond the gradients.

    Parameters
    ----------
    grad_out : the gradient of the output, the output's shape (..., H, L, Ev)
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
    causal_alignment : as given to the forward
    out : (..., H, L, Ev), lse : (..., H, L)
        The forward's output and log-sum-exp.
    dropout_seed : int in [0, 2**32)
        With dropout_p > 0: the seed the forward was given, so that the same
        weights are dropped. Required then.

    Returns
    -------
    (dq, dk, dv) with the shapes of query, key and value. Where an input was
    broadcast (a key shared by every batch entry or head), its gradient is
    summed over those entries; with enable_gqa, dk and dv sum over the query
    heads that share each key/value head. A query that attends to nothing
    passes no gradient, never NaN. Bitwise the same at any thread count.
    """
    func = "scaled_dot_product_attention_backward"
    p = _attention_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           causal_alignment, func)
    q, k, v, batch, H, Hkv, L, S, E, Ev = p.q, p.k, p.v, p.batch, p.H, p.Hkv, p.L, p.S, p.E, p.Ev
    seed = 0
    if p.dropout_p > 0:
        if dropout_seed is None:
            raise ValueError(f"{func}: dropout_p={p.dropout_p} needs the dropout_seed the forward "
                             "was given (draw one, and pass it to both)")
        seed = _dropout_seed(dropout_seed, func)
    head = () if p.two_d else (H,)
    out_shape = batch + head + (L, Ev)
    g = _saved(grad_out, out_shape, q.dtype, func, "grad_out")
    o = _saved(out, out_shape, q.dtype, func, "out")
    lse = _saved(lse, batch + head + (L,), q.dtype, func, "lse")
    q4 = _attention_operand(q if E else _zero_column(q), batch + (H, L, max(E, 1)))
    k4 = _attention_operand(k if E else _zero_column(k), batch + (Hkv, S, max(E, 1)))
    v4 = _attention_operand(v, batch + (Hkv, S, Ev))
    mask4 = None if attn_mask is None else _attention_mask(attn_mask, q, batch + (H, L, S), func)
    dq = np.zeros(batch + (H, L, max(E, 1)), q.dtype)
    dk = np.zeros(batch + (Hkv, S, max(E, 1)), q.dtype)
    dv = np.zeros(batch + (Hkv, S, Ev), q.dtype)
    if Ev > 0:   # with Ev = 0 no weight reaches the output: every gradient is 0
        shape4 = batch + (H, L)
        _kernels.attention_backward(dq, dk, dv, g.reshape(shape4 + (Ev,)), o.reshape(shape4 + (Ev,)),
                                    lse.reshape(shape4), q4, k4, v4, mask4, p.scale, p.is_causal,
                                    p.offset, p.dropout_p, seed)
    if E == 0:
        dq, dk = dq[..., :0], dk[..., :0]
    if p.two_d:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return (_sum_to_shape(dq, q.shape), _sum_to_shape(dk, k.shape), _sum_to_shape(dv, v.shape))


# ---------------------------------------------------------------------------
# The pieces layers are made of: linear maps, activations, dropout, batch norm

_LINEAR_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


def linear(x: npt.ArrayLike, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None, *,
           activation: _Activation | None = None, residual: npt.ArrayLike | None = None) -> _Float:
    """x @ weight.T + bias, as torch.nn.functional.linear.

    x (..., in_features), weight (out_features, in_features), bias
    (out_features) or None; all of one float dtype. The product is attnkit's
    own GEMM, on its threads (set_num_threads governs it), with the bias add
    in the same pass; the weight is read as it is, never cached, so an edit
    in place is seen by the next call.

    activation (an attnkit extension): None, or "gelu", "gelu_tanh", "silu"
    or "relu" to return activation(x @ weight.T + bias) with the bias add
    and the activation done in one pass over the product, as a feed-forward
    block's first layer wants.

    residual (an attnkit extension): None, or an array of the output's shape
    (..., out_features) and dtype, added to the result in the same pass:
    activation(x @ weight.T + bias) + residual, a transformer's skip
    connection without a pass of its own.
    """
    func = "linear"
    if activation is not None and activation not in _LINEAR_ACTIVATIONS:
        raise ValueError(f"{func}: activation must be None or one of {', '.join(_LINEAR_ACTIVATIONS)}, "
                         f"got {activation!r}")
    x = _as_float_array(x, func, "input")
    weight = _as_float_array(weight, func, "weight")
    if weight.ndim != 2:
        raise ValueError(f"{func}: weight must be (out_features, in_features), got {weight.shape}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{func}: input's last dimension must be in_features = {weight.shape[1]}, "
                         f"got input {x.shape} and weight {weight.shape}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{func}: weight has dtype {weight.dtype} but the input is {x.dtype}")
    if bias is not None:
        bias = _as_float_array(bias, func, "bias")
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype:
            raise ValueError(f"{func}: bias must be ({weight.shape[0]},) of {x.dtype}, got "
                             f"{bias.shape} {bias.dtype}")
    out_shape = x.shape[:-1] + (weight.shape[0],)
    if residual is not None:
        residual = _as_float_array(residual, func, "residual")
        if residual.shape != out_shape or residual.dtype != x.dtype:
            raise ValueError(f"{func}: residual must be the output's shape {out_shape} and dtype {x.dtype}, "
                             f"got {residual.shape} {residual.dtype}")
        residual = residual.reshape(-1, weight.shape[0]) if residual.size else None
    rows = _readable_as(x, (math.prod(x.shape[:-1]), x.shape[-1]), 1)
    return _linear_rows(rows, weight, bias, activation, residual).reshape(out_shape)


def _linear_rows(rows: _Array, weight: _Array, bias: _Array | None, activation: str | None = None,
                 residual: _Array | None = None) -> _Array:
    """f(rows (M, K) @ weight (N, K).T + bias) + residual (M, N) as a new
    (M, N) array, by attnkit's GEMM, for arguments already checked: rows with
    a contiguous last axis (rows may be apart), weight, bias and residual of
    rows' dtype."""
    out = np.empty((rows.shape[0], weight.shape[0]), rows.dtype)
    return _kernels.linear(out, rows, _weight_operand(weight), None if bias is None else _contiguous(bias),
                           activation or "identity", None if residual is None else _contiguous(residual))


def _weight_operand(weight: _Array) -> _Array:
    """weight as the GEMM reads it in place: rows contiguous (PyTorch's
    layout), or columns contiguous (a weight stored transposed, such as
    `w.T` of a C-contiguous w); any other layout is copied."""
    return weight if _kernels.has_weight_layout(weight) else _contiguous(weight)


@overload
def linear_backward(
    grad_output: npt.ArrayLike, x: npt.ArrayLike, weight: npt.ArrayLike, *,
    input_grad: Literal[True] = True, weight_grad: _Array | Literal[False] | None = None,
    bias_grad: _Array | Literal[False] | None = None,
) -> tuple[_Float, _Float | None, _Float | None]: ...
@overload
def linear_backward(
    grad_output: npt.ArrayLike, x: npt.ArrayLike, weight: npt.ArrayLike, *,
    input_grad: Literal[False], weight_grad: _Array | Literal[False] | None = None,
    bias_grad: _Array | Literal[False] | None = None,
) -> tuple[None, _Float | None, _Float | None]: ...
@overload
def linear_backward(
    grad_output: npt.ArrayLike, x: npt.ArrayLike, weight: npt.ArrayLike, *, input_grad: bool = True,
    weight_grad: _Array | Literal[False] | None = None, bias_grad: _Array | Literal[False] | None = None,
) -> tuple[_Float | None, _Float | None, _Float | None]: ...
def linear_backward(
    grad_output: npt.ArrayLike, x: npt.ArrayLike, weight: npt.ArrayLike, *, input_grad: bool = True,
    weight_grad: _Array | Literal[False] | None = None, bias_grad: _Array | Literal[False] | None = None,
) -> tuple[_Float | None, _Float | None, _Float | None]:
    """The gradients of y = x @ weight.T + bias (linear's backward).

    grad_output (..., out_features) is dLoss/dy; x (..., in_features) the
    forward's input, with the same leading dimensions; weight (out_features,
    in_features). Returns (d_input, d_weight, d_bias):

      d_input  (..., in_features)          = grad_output @ weight
      d_weight (out_features, in_features) = sum over rows of grad_output^T x
      d_bias   (out_features,)             = sum over rows of grad_output

    input_grad=False skips d_input (None is returned). weight_grad and
    bias_grad: None computes a new array; False skips it (a frozen
    parameter); an array accumulates into it in place (+=), as gradients
    add up over micro-batches, and is returned. All on attnkit's threads,
    each element summed in an order fixed by the shapes, so results are
    bitwise the same at any thread count.
    """
    func = "linear_backward"
    dy = _as_float_array(grad_output, func, "grad_output")
    x = _as_float_array(x, func, "input")
    weight = _as_float_array(weight, func, "weight")
    if weight.ndim != 2:
        raise ValueError(f"{func}: weight must be (out_features, in_features), got {weight.shape}")
    N, K = weight.shape
    if dy.ndim == 0 or x.ndim != dy.ndim or dy.shape[-1] != N or x.shape[-1] != K \
            or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{func}: expected grad_output (..., {N}) and input (..., {K}) with the same "
                         f"leading dimensions for weight {weight.shape}, got grad_output {dy.shape} "
                         f"and input {x.shape}")
    if x.dtype != dy.dtype or weight.dtype != dy.dtype:
        raise TypeError(f"{func}: grad_output, input and weight must share a dtype, got "
                        f"{dy.dtype}, {x.dtype} and {weight.dtype}")
    accumulators: list[Any] = []
    for name, given, shape in (("weight_grad", weight_grad, (N, K)), ("bias_grad", bias_grad, (N,))):
        if given is None:
            given = np.zeros(shape, dy.dtype, order="F" if name == "weight_grad" and not
                             weight.flags.c_contiguous and weight.flags.f_contiguous else "C")
        elif given is False:
            given = None
        elif not isinstance(given, np.ndarray):
            raise TypeError(f"{func}: {name} must be None, False or an ndarray, got {type(given).__name__}")
        else:
            if given.shape != shape or given.dtype != dy.dtype:
                raise ValueError(f"{func}: {name} must be {shape} of {dy.dtype}, got {given.shape} "
                                 f"of {given.dtype}")
            if not given.flags.writeable:
                raise ValueError(f"{func}: {name} is read-only")
            for other_name, other in (("grad_output", dy), ("input", x), ("weight", weight)):
                if np.shares_memory(given, other):
                    raise ValueError(f"{func}: {name} overlaps {other_name}")
        accumulators.append(given)
    if accumulators[0] is not None and accumulators[1] is not None \
            and np.shares_memory(accumulators[0], accumulators[1]):
        raise ValueError(f"{func}: weight_grad and bias_grad overlap")
    dw, db = accumulators
    M = math.prod(dy.shape[:-1])
    rows = _contiguous(dy.reshape(M, N))
    x_rows = _readable_as(x, (M, K), 1)
    dx = np.empty(x_rows.shape, dy.dtype) if input_grad else None
    # accumulators the kernel cannot write in place go through a copy
    dw_kernel = dw if dw is None or _kernels.has_weight_layout(dw) else np.zeros((N, K), dy.dtype)
    db_kernel = db if db is None or (db.flags.c_contiguous and db.flags.aligned) else np.zeros(N, dy.dtype)
    _kernels.linear_backward(dx, dw_kernel, db_kernel, rows, x_rows, _weight_operand(weight))
    if dw_kernel is not dw:
        dw += dw_kernel
    if db_kernel is not db:
        db += db_kernel
    return (None if dx is None else dx.reshape(x.shape)), dw, db


def relu(x: npt.ArrayLike, *, out: _Float | None = None) -> _Float:
    """max(x, 0) for x of any shape (...); NaN stays NaN. out: as for gelu."""
    x = _as_float_array(x, "relu")
    if out is not None:
        _check_out(out, x, "relu")
        return np.maximum(x, 0, dtype=x.dtype, out=out)
    return np.asarray(np.maximum(x, 0, dtype=x.dtype))   # a 0-d x gives a 0-d array, not a scalar


def sigmoid(x: npt.ArrayLike) -> _Float:
    """1 / (1 + exp(-x)) for x of any shape (...), without overflow for large |x|."""
    x = _as_float_array(x, "sigmoid")
    e = np.exp(-np.abs(x))                       # in (0, 1]: never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def _elementwise(x: npt.ArrayLike, name: str, out: _Float | None) -> _Float:
    x = _contiguous(_as_float_array(x, name))
    if out is None:
        return _kernels.bias_activation(np.empty_like(x), x, None, name)
    _check_out(out, x, name)
    if out.flags.c_contiguous and out.flags.aligned and (
            out is x or _same_layout(out, x) or not np.shares_memory(out, x)):
        return _kernels.bias_activation(out, x, None, name)
    out[...] = _kernels.bias_activation(np.empty_like(x), x, None, name)   # a strided or overlapping out
    return out


def gelu(x: npt.ArrayLike, approximate: Literal["none", "tanh"] = "none", *,
         out: _Float | None = None) -> _Float:
    """x * Phi(x) for x of any shape (...), Phi the standard normal CDF (approximate="none", the exact
    GELU, with erf), or its tanh approximation (approximate="tanh"), as
    torch.nn.functional.gelu.

    out: an array of x's shape and dtype, C-contiguous, to write the result
    into (NumPy's convention); it may be x itself, which spares a large
    temporary in a feed-forward block."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _elementwise(x, "gelu" if approximate == "none" else "gelu_tanh", out)


def silu(x: npt.ArrayLike, *, out: _Float | None = None) -> _Float:
    """x * sigmoid(x) (also called swish), x of any shape (...). out: as for gelu."""
    return _elementwise(x, "silu", out)


def _activation_backward(grad: npt.ArrayLike, x: npt.ArrayLike, bias: npt.ArrayLike | None,
                         name: str, func: str, want_dbias: bool) -> tuple[_Array, Any]:
    """dx = grad * f'(x + bias) by the kernel, and the column sums of dx when
    want_dbias; arguments checked here."""
    x = _as_float_array(x, func, "input")
    dy = _gradient_for(grad, x, func, "the input")
    cols = x.shape[-1] if x.ndim else 1
    if bias is not None:
        bias = _as_float_array(bias, func, "bias")
        if x.ndim == 0 or bias.shape != (cols,):
            raise ValueError(f"{func}: bias must have shape ({cols},), the input's last dimension, "
                             f"got {bias.shape} for input {x.shape}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{func}: bias has dtype {bias.dtype} but the input is {x.dtype}")
        bias = _contiguous(bias)
    x, dy = _contiguous(x), _contiguous(dy)
    dx = np.empty(x.shape, x.dtype)
    dbias = np.zeros(cols, x.dtype) if want_dbias else None
    _kernels.bias_activation_backward(dx, dbias, dy, x, bias, name)
    return dx, dbias


def relu_backward(grad: npt.ArrayLike, x: npt.ArrayLike) -> _Float:
    """The gradient of relu, grad and x of one shape (...) and dtype: grad
    where x > 0, else 0 (PyTorch's: 0 at x == 0,
    and where x < 0 whatever grad holds); NaN where x is NaN."""
    return _activation_backward(grad, x, None, "relu", "relu_backward", False)[0]


def gelu_backward(grad: npt.ArrayLike, x: npt.ArrayLike,
                  approximate: Literal["none", "tanh"] = "none") -> _Float:
    """The gradient of gelu, grad and x of one shape (...) and dtype:
    grad * gelu'(x), with gelu'(x) = Phi(x) + x phi(x)
    (approximate="none") or the tanh approximation's derivative ("tanh"),
    as torch.ops.aten.gelu_backward."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_backward: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activation_backward(grad, x, None, "gelu" if approximate == "none" else "gelu_tanh",
                                "gelu_backward", False)[0]


def silu_backward(grad: npt.ArrayLike, x: npt.ArrayLike) -> _Float:
    """The gradient of silu, grad and x of one shape (...) and dtype:
    grad * s (1 + x (1 - s)), s = sigmoid(x)."""
    return _activation_backward(grad, x, None, "silu", "silu_backward", False)[0]


def bias_activation_backward(grad: npt.ArrayLike, x: npt.ArrayLike, bias: npt.ArrayLike | None = None,
                             activation: _Activation | None = None) -> tuple[_Float, _Float]:
    """The gradients of activation(x + bias), the tail linear(..., activation=)
    fuses: returns (dx, dbias) with dx = grad * activation'(x + bias) and
    dbias = dx summed over every row (shape (x.shape[-1],), always returned).

    x (..., C) is the pre-activation input (the product x @ W.T, before the
    bias), grad (..., C) the gradient of the output, bias (C) or None;
    activation None (the bias add alone), "gelu", "gelu_tanh", "silu" or
    "relu", as linear's. dbias sums rows in an order fixed by the shape, so it
    is bitwise the same at any thread count.
    """
    func = "bias_activation_backward"
    if activation is not None and activation not in _LINEAR_ACTIVATIONS:
        raise ValueError(f"{func}: activation must be None or one of {', '.join(_LINEAR_ACTIVATIONS)}, "
                         f"got {activation!r}")
    if np.ndim(x) == 0:
        raise ValueError(f"{func}: the input needs a last dimension (features), got shape {np.shape(x)}")
    return _activation_backward(grad, x, bias, activation or "identity", func, True)


def dropout(x: npt.ArrayLike, p: float = 0.5, training: bool = True, *,
            rng: np.random.Generator | None = None, seed: int | None = None) -> _Float:
    """Zero each element of x (any shape (...)) with probability p and scale
    the rest by 1/(1-p) when training; x itself otherwise.

    Which elements are dropped is a hash of (seed, element index), computed
    in C in the same pass (the same hash as attention's dropout; the NumPy
    reference is attnkit.reference.dropout). seed: an int in [0, 2**32), or
    None to draw one from rng (a NumPy Generator; seeded for reproducible
    masks) or, without rng, from a fresh one. Dropout's backward is this same
    function applied to the gradient with the same seed:
    dropout(grad, p, seed=seed) drops what the forward dropped.
    """
    func = "dropout"
    x = _as_float_array(x, func)
    p = _real(p, func, "p")
    training = _flag(training, func, "training")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{func}: p must be in [0, 1], got {p}")
    if seed is not None:
        if rng is not None:
            raise ValueError(f"{func}: pass rng or seed, not both")
        seed = _dropout_seed(seed, func)
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = _draw_dropout_seed(rng, func)
    x = _contiguous(x)
    return _kernels.dropout(np.empty_like(x), x, p, seed)


def _draw_dropout_seed(rng: np.random.Generator | None, func: str) -> int:
    """A dropout seed drawn from rng (a fresh generator if None): one number a call."""
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"{func}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return int(rng.integers(0, 2**32, dtype=np.uint64))


def batch_norm(x: npt.ArrayLike, running_mean: _Array | None, running_var: _Array | None,
               weight: npt.ArrayLike | None = None, bias: npt.ArrayLike | None = None,
               training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
               padding_mask: npt.ArrayLike | None = None) -> _Float:
    """Batch normalisation over the batch (and length) dimensions, as
    torch.nn.functional.batch_norm: x (N, C) or (N, C, L); running_mean,
    running_var, weight and bias (C) or None. Returns x's shape and dtype.

    training=True normalises by this batch's mean and biased variance and
    updates running_mean/running_var in place (running = (1 - momentum) *
    running + momentum * batch, with the unbiased variance), as PyTorch does;
    training=False normalises by the running statistics. Compare layer_norm,
    which normalises each sample over its own features and so behaves the
    same for a batch of one, and for any sequence length.

    padding_mask (an attnkit extension): a bool array, (N, L) for (N, C, L)
    input or (N,) for (N, C), True where a position is padding (as
    key_padding_mask). Padded positions take no part in the batch statistics
    (mean, variance and the running averages come from the n kept positions,
    the running variance unbiased with n - 1) but are normalised with the
    same statistics as the rest. With the running statistics it changes
    nothing. (For (N, L, C) input use nn.BatchNorm1d(..., channels_last=True),
    or pass x.transpose(0, 2, 1).)
    """
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       padding_mask)[0]


def _batch_norm(x: npt.ArrayLike, running_mean: _Array | None, running_var: _Array | None,
                weight: npt.ArrayLike | None, bias: npt.ArrayLike | None, training: bool,
                momentum: float | None, eps: float,
                padding_mask: npt.ArrayLike | None = None) -> tuple[_Array, _Array, _Array]:
    """batch_norm's output and the statistics it used, per channel in
    float64: (out, mean, rstd = 1 / sqrt(var + eps)), what its backward needs."""
    func = "batch_norm"
    x = _as_float_array(x, func, "input")
    if x.ndim not in (2, 3):
        raise ValueError(f"{func}: input must be (N, C) or (N, C, L), got shape {x.shape}")
    eps = _check_eps(eps, func)
    training = _flag(training, func, "training")
    updates = training and (running_mean is not None or running_var is not None)
    if momentum is not None or updates:     # None only where no running average is updated
        momentum = _real(momentum, func, "momentum")
    C = x.shape[1]
    axes = (0,) if x.ndim == 2 else (0, 2)
    shape = (1, C) if x.ndim == 2 else (1, C, 1)
    for name, a in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if a is not None and np.shape(a) != (C,):
            if np.ndim(a) == 1:
                raise ValueError(
                    f"{func}: input must be (N, C) or (N, C, L) with C = {np.shape(a)[0]} (the "
                    f"size of {name}) on axis 1, got shape {x.shape}; for (N, L, C) input pass "
                    "x.transpose(0, 2, 1)")
            raise ValueError(f"{func}: {name} must have shape ({C},), got {np.shape(a)}")
    keep = _batch_norm_keep(padding_mask, x, func)
    if x.size == 0:
        # nothing to normalise and no statistics to take: PyTorch returns the
        # empty batch and leaves the running averages alone (and C = 0 must
        # not reach the division below)
        return np.empty_like(x), np.zeros(C), np.ones(C)
    if training:
        count = x.size // C if keep is None else int(np.count_nonzero(keep))
        if count <= 1:
            kept = "" if keep is None else f" ({count} not padded)"
            raise ValueError(f"{func}: training needs more than one value per channel, got "
                             f"input of shape {x.shape}{kept}")
        if keep is None:
            mean = x.mean(axis=axes, dtype=np.float64)
            var = x.var(axis=axes, dtype=np.float64)
        else:   # over the kept positions only
            k = _batch_norm_weights(keep, x.ndim) != 0   # (N, 1) or (N, 1, L)
            mean = np.where(k, x, 0).sum(axis=axes, dtype=np.float64) / count
            var = np.where(k, np.square(x - mean.reshape(shape)), 0).sum(axis=axes) / count
        # momentum is None only when nothing is updated (checked above)
        if running_mean is not None:
            running_mean *= 1 - momentum  # type: ignore[operator]
            running_mean += momentum * mean
        if running_var is not None:
            running_var *= 1 - momentum  # type: ignore[operator]
            running_var += momentum * var * count / (count - 1)
    else:
        if running_mean is None or running_var is None:
            raise ValueError(f"{func}: evaluation needs running_mean and running_var")
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    rstd = 1 / np.sqrt(var + eps)
    scale = rstd if weight is None else rstd * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    out = x * scale.reshape(shape).astype(x.dtype) + shift.reshape(shape).astype(x.dtype)
    return out, mean, rstd


def _batch_norm_keep(padding_mask: npt.ArrayLike | None, x: _Array, func: str) -> _Array | None:
    """padding_mask (True = padded) as a bool array of the kept positions,
    (N,) for (N, C) input or (N, L) for (N, C, L); None when there is none."""
    if padding_mask is None:
        return None
    mask = np.asarray(padding_mask)
    want = (x.shape[0],) if x.ndim == 2 else (x.shape[0], x.shape[2])
    if mask.dtype != np.bool_:
        raise TypeError(f"{func}: padding_mask must be a bool array (True = padded), got "
                        f"dtype {mask.dtype}")
    if mask.shape != want:
        raise ValueError(f"{func}: padding_mask must have shape {want} (N{', L' if x.ndim == 3 else ''})"
                         f" for input of shape {x.shape}, got {mask.shape}")
    return ~mask


def _batch_norm_weights(keep: _Array, ndim: int) -> _Array:
    """keep as float64 weights broadcasting against (N, C) or (N, C, L)."""
    return keep.astype(np.float64)[:, None] if ndim == 2 else keep.astype(np.float64)[:, None, :]
