"""Losses with PyTorch's names, arguments and formulas, and their gradients.

    >>> import numpy as np
    >>> from attnkit import nn
    >>> criterion = nn.CrossEntropyLoss()
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> round(criterion(logits, np.array([0, 2])), 6)
    0.175456
    >>> criterion.backward().round(4)              # d loss / d logits
    array([[-0.1072,  0.0876,  0.0196],
           [ 0.0247,  0.0272, -0.0519]])

`loss = criterion(input, target)` returns a float (an array with
reduction="none") and keeps what the gradient needs; `criterion.backward()`
returns the gradient of the loss with respect to `input` (times
`grad_output`, a scalar, or an array of the loss's shape with "none").
Formulas are the numerically stable ones: cross-entropy through
log_softmax, BCE with logits through softplus, so no logit overflows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import functional as F
from ..functional import log_softmax, log_softmax_backward
from .module import Module

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]
    _Reduction = Literal["none", "mean", "sum"]

_REDUCTIONS = ("none", "mean", "sum")


class _Loss(Module):
    def __init__(self, reduction: _Reduction) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be 'none', 'mean' or 'sum', "
                             f"got {reduction!r}")
        self.reduction = reduction
        self._saved = None

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def _reduced(self, per_element: _Array, divisor: float) -> float | _Array:
        """The loss from its per-element values (float64 sums)."""
        if self.reduction == "none":
            return per_element
        total = float(np.sum(per_element, dtype=np.float64))
        if self.reduction == "sum":
            return total
        return total / divisor if divisor else float("nan")   # nothing counted: 0/0, as PyTorch

    def _upstream(self, grad_output: npt.ArrayLike | None, loss_shape: Any,
                  dtype: npt.DTypeLike) -> Any:
        """grad_output as a factor of each element's gradient."""
        name = type(self).__name__
        if self._saved is None:
            raise RuntimeError(f"{name}.backward: call the loss on an input first")
        if grad_output is None:
            return np.ones(loss_shape, dtype) if self.reduction == "none" else 1.0
        g = np.asarray(grad_output, dtype=dtype)
        if self.reduction == "none":
            if g.shape != loss_shape:
                raise ValueError(f"{name}.backward: grad_output has shape {g.shape}, expected the "
                                 f"loss's {loss_shape}")
            return g
        if g.size != 1:
            raise ValueError(f"{name}.backward: the loss is a scalar, so grad_output must be one "
                             f"number, got shape {g.shape}")
        return float(g.reshape(()))


def _input_and_target(input: npt.ArrayLike, target: npt.ArrayLike, name: str) -> tuple[_Array, _Array]:
    """input as a float array, and target as one of its dtype and shape."""
    x = F._as_float_array(input, name, "input")
    y = np.asarray(target)
    if y.dtype.kind not in "fiub":
        raise TypeError(f"{name}: target must be numbers, got dtype {y.dtype} (shape {y.shape})")
    y = y.astype(x.dtype, copy=False)
    if y.shape != x.shape:
        raise ValueError(f"{name}: target must have input's shape {x.shape}, got {y.shape}")
    return x, y


def _weight_vector(weight: npt.ArrayLike | None, n: int, dtype: npt.DTypeLike, name: str,
                   what: str = "weight") -> _Array | None:
    if weight is None:
        return None
    w = np.asarray(weight, dtype=dtype)
    if w.shape != (n,):
        raise ValueError(f"{name}: {what} must have shape ({n},), got {w.shape}")
    return w


class CrossEntropyLoss(_Loss):
    """torch.nn.CrossEntropyLoss: log_softmax over the class axis, then the
    negative log-likelihood of the target.

    input: (C,), (N, C) or (N, C, d1, ...) logits, float32 or float64, the
    classes along axis 1 (axis 0 for 1-d input). target: class indices, an
    integer array of input's shape without the class axis (ignore_index
    marks elements that take no part); or class probabilities of input's
    shape. weight: (C,) a weight per class. label_smoothing: the target
    mixed with the uniform distribution, (1 - e) * target + e / C.
    reduction "mean" divides by the summed weights of the counted elements
    (as PyTorch: by their number without weight; with probabilities, by the
    number of elements); "sum" adds; "none" gives each element's loss.
    """

    def __init__(self, weight: npt.ArrayLike | None = None, ignore_index: int = -100,
                 reduction: _Reduction = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(reduction)
        self.weight = None if weight is None else np.array(weight, copy=True)
        self.ignore_index = F._index(ignore_index, "CrossEntropyLoss", "ignore_index")
        self.label_smoothing = F._real(label_smoothing, "CrossEntropyLoss", "label_smoothing")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")

    def forward(self, input: npt.ArrayLike, target: npt.ArrayLike) -> float | _Float:
        """input (C,), (N, C) or (N, C, d1, ...); target (), (N) or (N, d1, ...)
        class indices, or probabilities of input's shape. Returns a float, or
        the loss of each element, (), (N) or (N, d1, ...), with "none"."""
        name = "CrossEntropyLoss"
        x = F._as_float_array(input, name, "input")
        if x.ndim == 0:
            raise ValueError(f"{name}: input needs a class axis, got a 0-d array")
        axis = 0 if x.ndim == 1 else 1
        C = x.shape[axis]
        rest = x.shape[:axis] + x.shape[axis + 1:]         # input's shape without the class axis
        t = np.asarray(target)
        w = _weight_vector(self.weight, C, x.dtype, name)
        w_b = None if w is None else w.reshape((C,) + (1,) * (x.ndim - axis - 1))  # along the class axis
        eps = self.label_smoothing
        logp = log_softmax(x, axis=axis)                    # input's shape
        if t.dtype.kind in "iu":
            if t.shape != rest:
                raise ValueError(f"{name}: class-index target must have shape {rest} (input {x.shape} "
                                 f"without its class axis), got {t.shape}")
            counted = t != self.ignore_index                # rest
            bad = counted & ((t < 0) | (t >= C))
            if bad.any():
                raise ValueError(f"{name}: target holds class {int(t[bad].flat[0])}, outside [0, {C}) "
                                 f"(and not ignore_index={self.ignore_index})")
            safe = np.where(counted, t, 0)
            picked_weight = np.where(counted, 1.0 if w is None else w[safe], 0)
            divisor = float(np.sum(picked_weight, dtype=np.float64))
            if eps == 0:
                # one class counts per element: gather its logp rather than
                # spell out a dense one-hot coefficient (class count times larger)
                index = np.expand_dims(safe, axis)
                picked = np.take_along_axis(logp, index, axis=axis).squeeze(axis)       # rest
                # an ignored element adds 0, even where its stand-in class's logp is -inf
                per_element = np.multiply(-picked, picked_weight.astype(x.dtype), where=counted,
                                          out=np.zeros(rest, x.dtype))
                self._saved = (logp, (index, picked_weight.astype(x.dtype)), axis, divisor, rest)
                return self._reduced(per_element.astype(x.dtype), divisor)
            onehot = np.expand_dims(safe, axis) == np.arange(C).reshape((C,) + (1,) * (x.ndim - axis - 1))
            # the coefficient of each logp in the loss, per element: (1 - e) at the
            # target class and e / C everywhere, times the class weights
            coef = (1 - eps) * onehot + eps / C
            if w_b is not None:
                coef = coef * w_b
            coef = np.where(np.expand_dims(counted, axis), coef, 0).astype(x.dtype)
        else:
            t = F._as_float_array(target, name, "target")
            if t.shape != x.shape:
                hint = (" (class indices must be an integer array: target.astype(np.int64))"
                        if t.shape == rest else "")
                raise ValueError(f"{name}: probability target must have input's shape {x.shape}, "
                                 f"got {t.shape}{hint}")
            coef = t * (1 - eps) + eps / C
            if w_b is not None:
                coef = coef * w_b
            coef = coef.astype(x.dtype)
            divisor = float(np.prod(rest, dtype=np.float64)) if rest else 1.0
        # a class with no part in the loss adds 0, even where its logp is -inf
        terms = np.multiply(coef, logp, out=np.zeros_like(logp), where=coef != 0)
        per_element = -np.sum(terms, axis=axis)             # rest
        self._saved = (logp, coef, axis, divisor, rest)
        loss = self._reduced(per_element.astype(x.dtype), divisor)
        return loss

    def backward(self, grad_output: npt.ArrayLike | None = None) -> _Float:
        """d loss / d input, input's shape: log_softmax's backward of -coef,
        scaled as the reduction and grad_output (a number, or the loss's
        shape with "none") say."""
        # (None, ...) only when nothing is saved, which _upstream refuses
        logp: Any
        coef: Any
        axis: Any
        logp, coef, axis, divisor, rest = self._saved if self._saved else (None,) * 5
        g = self._upstream(grad_output, rest, logp.dtype if logp is not None else np.float64)
        if self.reduction == "mean":
            g = g / divisor if divisor else 0.0 * g
        scale = np.expand_dims(g, axis) if self.reduction == "none" else g
        if isinstance(coef, tuple):
            # one class per element, coefficient w at it: log_softmax's backward
            # of -w scale there is (softmax - onehot) w scale
            index, picked_weight = coef
            factor = (np.expand_dims(picked_weight, axis) * scale).astype(logp.dtype)
            dx = np.exp(logp)
            dx *= factor
            np.put_along_axis(dx, index, np.take_along_axis(dx, index, axis=axis) - factor, axis=axis)
            return dx
        return log_softmax_backward((-coef * scale).astype(logp.dtype), logp, axis=axis)


class BCEWithLogitsLoss(_Loss):
    """torch.nn.BCEWithLogitsLoss: a sigmoid and binary cross-entropy in one,
    (1 - y) x + (1 + (p - 1) y) softplus(-x), so no logit overflows.

    input: logits of any shape; target: probabilities of the same shape;
    weight: broadcast to input (a weight per element or per class);
    pos_weight: a weight on the positive term, broadcast along the last axis
    (one per class), for imbalanced labels. "mean" divides by the number of
    elements.
    """

    def __init__(self, weight: npt.ArrayLike | None = None, reduction: _Reduction = "mean",
                 pos_weight: npt.ArrayLike | None = None) -> None:
        super().__init__(reduction)
        self.weight = None if weight is None else np.array(weight, copy=True)
        self.pos_weight = None if pos_weight is None else np.array(pos_weight, copy=True)

    def forward(self, input: npt.ArrayLike, target: npt.ArrayLike) -> float | _Float:
        """input (...) logits, target (...) of input's shape. Returns a float,
        or input's shape with "none"."""
        x, y = _input_and_target(input, target, "BCEWithLogitsLoss")
        log_weight: float | _Array = 1.0
        if self.pos_weight is not None:
            log_weight = (np.asarray(self.pos_weight, x.dtype) - 1) * y + 1
        softplus = np.logaddexp(0, -x)                      # log(1 + exp(-x)), stably
        per_element = (1 - y) * x + log_weight * softplus
        w = None
        if self.weight is not None:
            w = np.asarray(self.weight, x.dtype)
            try:
                per_element = per_element * w
            except ValueError:
                raise ValueError(f"BCEWithLogitsLoss: weight of shape {w.shape} does not broadcast to "
                                 f"input's {x.shape}") from None
        per_element = np.broadcast_to(per_element, x.shape).astype(x.dtype)
        self._saved = (x, y, log_weight, w)
        return self._reduced(per_element, x.size)

    def backward(self, grad_output: npt.ArrayLike | None = None) -> _Float:
        """d loss / d input = w ((1 - y) - log_weight * sigmoid(-x)), input's shape."""
        x: Any
        y: Any
        x, y, log_weight, w = self._saved if self._saved else (None,) * 4
        g = self._upstream(grad_output, None if x is None else x.shape,
                           np.float64 if x is None else x.dtype)
        sigmoid_neg = np.exp(-np.logaddexp(0, x))           # sigmoid(-x), stably
        grad = (1 - y) - log_weight * sigmoid_neg
        if w is not None:
            grad = grad * w
        if self.reduction == "mean":
            g = g / x.size if x.size else 0.0 * g
        return np.broadcast_to(grad * g, x.shape).astype(x.dtype)


class MSELoss(_Loss):
    """torch.nn.MSELoss: (input - target)^2, averaged or summed."""

    def __init__(self, reduction: _Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(self, input: npt.ArrayLike, target: npt.ArrayLike) -> float | _Float:
        """input (...) and target (...) of one shape. Returns a float, or
        input's shape with "none"."""
        x, y = _input_and_target(input, target, "MSELoss")
        diff = x - y
        self._saved = diff
        return self._reduced(diff * diff, x.size)

    def backward(self, grad_output: npt.ArrayLike | None = None) -> _Float:
        """d loss / d input = 2 (input - target), input's shape, scaled by the reduction."""
        diff = self._saved
        g = self._upstream(grad_output, None if diff is None else diff.shape,
                           np.float64 if diff is None else diff.dtype)
        if self.reduction == "mean":
            g = g / diff.size if diff.size else 0.0 * g
        return (2 * diff * g).astype(diff.dtype)
