"""The layers transformers are built of, with PyTorch's names, parameter
shapes and default initialisation.

Every layer takes `dtype` (float32, the default, or float64) and `rng`, a
NumPy Generator its initial weights are drawn from (a seeded one gives the
same weights every time).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import functional as F
from . import init
from .module import Module

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]

__all__ = ["Linear", "LayerNorm", "RMSNorm", "BatchNorm1d", "Dropout", "Embedding", "Identity",
           "ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "get_activation"]


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"layers compute in float32 or float64, not {dtype}")
    return dtype


def _positive(value: object, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _input(layer: Module, x: npt.ArrayLike) -> _Array:
    """x as a float array; when the layer has parameters, of their dtype
    (another float dtype is an error, as in PyTorch)."""
    x = F._as_float_array(x, type(layer).__name__, "input")
    dtype = layer._parameter_dtype()
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{type(layer).__name__}: input has dtype {x.dtype} but the layer's "
                        f"parameters are {layer.dtype}; convert one of them (layer.astype(...))")
    return x


class Identity(Module):
    """Returns its input (..., any shape) as it is."""

    def forward(self, x: Any) -> Any:
        dtype = getattr(x, "dtype", None)
        floating = dtype is not None and np.issubdtype(dtype, np.floating)
        self._save(np.shape(x), dtype if floating else np.result_type(float))
        return x

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        shape, dtype = self._saved
        return self._check_grad(grad, shape, dtype)


class Linear(Module):
    """y = x @ weight.T + bias.

    weight (out_features, in_features) and bias (out_features) start as
    PyTorch's: uniform in +-1/sqrt(in_features) (kaiming_uniform_ with a = sqrt(5)).
    """

    # parameters (typed as arrays: one made without, bias=False, is None)
    weight: _Array
    bias: _Array

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: npt.DTypeLike = np.float32, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.in_features = _positive(in_features, "in_features", "Linear")
        self.out_features = _positive(out_features, "out_features", "Linear")
        dtype = _float_dtype(dtype)
        weight = np.empty((self.out_features, self.in_features), dtype)
        init.kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
        self.register_parameter("weight", weight)
        b = None
        if bias:
            bound = 1 / math.sqrt(self.in_features)
            b = init.uniform_(np.empty(self.out_features, dtype), -bound, bound, rng=rng)
        self.register_parameter("bias", b)

    def forward(self, x: npt.ArrayLike, residual: npt.ArrayLike | None = None) -> _Float:
        """x (..., in_features) -> (..., out_features). residual (an attnkit
        extension): an array of the output's shape added in the same pass
        (F.linear's residual), for a skip connection."""
        x = _input(self, x)
        out = F.linear(x, self.weight, self.bias, residual=residual)
        self._save(x, out.shape)
        return out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        """d_input = grad @ weight; weight.grad += grad^T x; bias.grad += sum of
        grad's rows. (A residual's gradient is grad itself.)"""
        x, shape = self._saved
        grad = self._check_grad(grad, shape, x.dtype)
        dx, _, _ = F.linear_backward(grad, x, self.weight, weight_grad=self._grad_buffer("weight"),
                                     bias_grad=self._grad_buffer("bias"))
        return dx

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    """Layer normalisation over the trailing normalized_shape dimensions
    (attnkit.layer_norm); weight starts at 1, bias at 0. Call: x (...,
    *normalized_shape) -> x's shape."""

    # parameters (typed as arrays: None with elementwise_affine=False, or bias=False)
    weight: _Array
    bias: _Array

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, *,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.normalized_shape = F._shape_tuple(normalized_shape, "LayerNorm", "normalized_shape")
        self.eps = F._real(eps, "LayerNorm", "eps")
        dtype = self._dtype = _float_dtype(dtype)
        self.register_parameter("weight", np.ones(self.normalized_shape, dtype) if elementwise_affine else None)
        self.register_parameter("bias", np.zeros(self.normalized_shape, dtype)
                                if elementwise_affine and bias else None)

    def forward(self, x: npt.ArrayLike) -> _Float:
        x = _input(self, x)
        if not self.training:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out, mean, rstd = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                       return_stats=True)
        self._save(x, mean, rstd)
        return out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        x, mean, rstd = self._saved
        grad = self._check_grad(grad, x.shape, x.dtype)
        dx, dweight, dbias = F.layer_norm_backward(grad, x, mean, rstd, self.normalized_shape,
                                                   self.weight)
        self._accumulate("weight", dweight)
        self._accumulate("bias", dbias)
        return dx

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the trailing dimensions
    (attnkit.rms_norm); eps None is the dtype's machine epsilon. Call: x
    (..., *normalized_shape) -> x's shape."""

    weight: _Array        # None with elementwise_affine=False

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float | None = None,
                 elementwise_affine: bool = True, *, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.normalized_shape = F._shape_tuple(normalized_shape, "RMSNorm", "normalized_shape")
        self.eps = None if eps is None else F._real(eps, "RMSNorm", "eps")
        self._dtype = _float_dtype(dtype)
        self.register_parameter("weight", np.ones(self.normalized_shape, self._dtype)
                                if elementwise_affine else None)

    def forward(self, x: npt.ArrayLike) -> _Float:
        x = _input(self, x)
        if not self.training:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        out, rstd = F.rms_norm(x, self.normalized_shape, self.weight, self.eps, return_stats=True)
        self._save(x, rstd)
        return out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        x, rstd = self._saved
        grad = self._check_grad(grad, x.shape, x.dtype)
        dx, dweight = F.rms_norm_backward(grad, x, rstd, self.normalized_shape, self.weight)
        self._accumulate("weight", dweight)
        return dx

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class BatchNorm1d(Module):
    """Batch normalisation of (N, C) or (N, C, L) input, for comparison with
    LayerNorm: in training it normalises by the batch's statistics (so a batch
    of one sample is degenerate) and keeps running averages for evaluation.

    channels_last=True (an attnkit extension) takes (N, L, C) input instead
    (batch, tokens, features: the layout LayerNorm and the transformer layers
    use with batch_first=True) and returns that layout; (N, C) is the same in
    both. It computes what PyTorch's BatchNorm1d does on x.transpose(0, 2, 1).

    forward(x, padding_mask=None): padding_mask (an attnkit extension) is a
    bool (N, L) array ((N,) for (N, C) input), True where a position is
    padding, as MultiHeadAttention's key_padding_mask. Padded positions take
    no part in the batch statistics: mean and variance are over the kept
    (n, l) positions only, and the running averages are updated from those
    (the running variance unbiased with their count). Padded positions are
    still normalised, with the same statistics, so their outputs are finite
    and ordinary (mask them out of a loss yourself); their gradient flows only
    through their own normalisation. With the running statistics (eval mode)
    the mask changes nothing, and is accepted.
    """

    channels_last = False       # the default, also for layers pickled before it existed
    # parameters and buffers (typed as arrays: None with affine=False, or
    # track_running_stats=False)
    weight: _Array
    bias: _Array
    running_mean: _Array
    running_var: _Array
    num_batches_tracked: _Array

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 channels_last: bool = False, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.num_features = _positive(num_features, "num_features", "BatchNorm1d")
        self.eps = F._real(eps, "BatchNorm1d", "eps")
        self.momentum = None if momentum is None else F._real(momentum, "BatchNorm1d", "momentum")
        self.channels_last = F._flag(channels_last, "BatchNorm1d", "channels_last")
        dtype = self._dtype = _float_dtype(dtype)
        C = self.num_features
        self.register_parameter("weight", np.ones(C, dtype) if affine else None)
        self.register_parameter("bias", np.zeros(C, dtype) if affine else None)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype))
            self.register_buffer("running_var", np.ones(C, dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _check_layout(self, x: _Array) -> None:
        """A ValueError naming the shape received, the layout wanted and how
        to ask for the other one, unless x is (N, C) or the layer's 3-d layout."""
        C = self.num_features
        if self.channels_last:
            ok = x.ndim in (2, 3) and x.shape[-1] == C
            want = f"(N, C) or (N, L, C) with C = {C} on the last axis"
            other = "for (N, C, L) input use channels_last=False (the default)"
            name = f"BatchNorm1d({C}, channels_last=True)"
        else:
            ok = x.ndim in (2, 3) and x.shape[1] == C
            want = f"(N, C) or (N, C, L) with C = {C} on axis 1"
            other = "for (N, L, C) input pass channels_last=True"
            name = f"BatchNorm1d({C})"
        if not ok:
            raise ValueError(f"{name} expects {want}, got {tuple(x.shape)}; {other}")

    def forward(self, x: npt.ArrayLike, padding_mask: npt.ArrayLike | None = None) -> _Float:
        """x (N, C), (N, C, L), or (N, L, C) with channels_last; padding_mask
        (N,) or (N, L), True = padding. Returns x's shape."""
        x = _input(self, x)
        self._check_layout(x)
        transposed = self.channels_last and x.ndim == 3
        xc = x.transpose(0, 2, 1) if transposed else x          # (N, C) or (N, C, L), a view
        use_batch = self.training or not self.track_running_stats
        keep = F._batch_norm_keep(padding_mask, xc, "BatchNorm1d")
        momentum = self.momentum
        counted = self.training and self.track_running_stats
        if counted and momentum is None:   # a cumulative average, as PyTorch's momentum=None
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        out, mean, rstd = F._batch_norm(xc, self.running_mean, self.running_var, self.weight,
                                        self.bias, use_batch, momentum, self.eps,
                                        padding_mask if use_batch else None)
        if counted:                        # after the call: a batch it refused is not counted
            self.num_batches_tracked += 1
        self._save(xc, mean, rstd, use_batch, keep if use_batch else None, transposed)
        return out.transpose(0, 2, 1) if transposed else out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        """With the batch's statistics (per channel c, over the batch and
        length axes): xhat = (x - mean) * rstd, g = grad * weight, and with k
        = 1 at the n kept positions, 0 at padded ones (all 1 without a mask),
        dx = rstd * (g - k * (sum(g) + xhat * sum(g * xhat)) / n), the sums
        over every position (padded outputs use the statistics too, which
        depend on kept inputs only); without a mask, dx = rstd * (g - mean(g)
        - xhat * mean(g * xhat)). With the running statistics dx = g * rstd.
        For channels_last the same, on the transposed views."""
        x, mean, rstd, use_batch, keep, transposed = self._saved
        shape_in = x.transpose(0, 2, 1).shape if transposed else x.shape
        grad = self._check_grad(grad, shape_in, x.dtype)
        if transposed:
            grad = grad.transpose(0, 2, 1)
        if x.size == 0:
            dx = np.zeros_like(x)
            return dx.transpose(0, 2, 1) if transposed else dx
        axes = (0,) if x.ndim == 2 else (0, 2)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1)
        g64 = grad.astype(np.float64)
        xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)                  # float64
        self._accumulate("weight", (g64 * xhat).sum(axis=axes).astype(x.dtype))
        self._accumulate("bias", g64.sum(axis=axes).astype(x.dtype))
        g = g64 if self.weight is None else g64 * self.weight.reshape(shape)
        if use_batch:
            if keep is None:
                g = g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)
            else:
                n = int(np.count_nonzero(keep))
                k = F._batch_norm_weights(keep, x.ndim)
                g = g - k * (g.sum(axis=axes, keepdims=True)
                             + xhat * (g * xhat).sum(axis=axes, keepdims=True)) / n
        dx = (g * rstd.reshape(shape)).astype(x.dtype)
        return dx.transpose(0, 2, 1) if transposed else dx

    def extra_repr(self) -> str:
        last = ", channels_last=True" if self.channels_last else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{last}"


class Dropout(Module):
    """Zeroes elements with probability p while training (scaling the rest by
    1/(1-p)); the identity in eval(). Masks come from `rng`. Call: x (...,
    any shape) -> x's shape."""

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.p = F._real(p, "Dropout", "p")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x: npt.ArrayLike) -> _Float:
        x = F._as_float_array(x, "Dropout", "input")
        if not self.training or self.p == 0.0:
            self._save(None, x.shape, x.dtype)
            return x
        seed = F._draw_dropout_seed(self.rng, "Dropout")   # all that backward needs: no mask kept
        self._save(seed, x.shape, x.dtype)
        return F.dropout(x, self.p, seed=seed)

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        """The same elements dropped, the rest scaled by 1/(1-p), as forward:
        dropout of the gradient with the forward's seed."""
        seed, shape, dtype = self._saved
        grad = self._check_grad(grad, shape, dtype)
        return grad if seed is None else F.dropout(grad, self.p, seed=seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Embedding(Module):
    """A lookup table: integer indices (...) -> rows of weight (..., embedding_dim).
    weight (num_embeddings, embedding_dim) starts N(0, 1) as PyTorch's, with
    the padding_idx row 0."""

    weight: _Array

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 dtype: npt.DTypeLike = np.float32, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.num_embeddings = _positive(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = _positive(embedding_dim, "embedding_dim", "Embedding")
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} is out of range for "
                                 f"{self.num_embeddings} embeddings")
            padding_idx %= self.num_embeddings
        self.padding_idx = padding_idx
        weight = init.normal_(np.empty((self.num_embeddings, self.embedding_dim), _float_dtype(dtype)), rng=rng)
        if padding_idx is not None:
            weight[padding_idx] = 0
        self.register_parameter("weight", weight)

    def forward(self, indices: npt.ArrayLike) -> _Float:
        """indices (...) of an integer dtype -> (..., embedding_dim)."""
        indices = np.asarray(indices)
        if indices.dtype.kind not in "iu":
            raise TypeError(f"Embedding: indices must be integers, got dtype {indices.dtype}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_embeddings):
            raise IndexError(f"Embedding: indices must be in [0, {self.num_embeddings}), got "
                             f"values from {indices.min()} to {indices.max()}")
        self._save(indices)
        return self.weight[indices]

    def _backward(self, grad: npt.ArrayLike) -> None:
        """Adds each row of grad into the weight row it was read from (rows
        read several times get the sum, added in index order, so the result
        does not depend on threads); the padding_idx row gets nothing.
        Returns None: integer indices have no gradient."""
        indices = self._saved[0]
        grad = self._check_grad(grad, indices.shape + (self.embedding_dim,), self.weight.dtype)
        buffer = self._grad_buffer("weight")
        if buffer is False:
            return None
        rows = indices.reshape(-1)
        grad = grad.reshape(-1, self.embedding_dim)
        if self.padding_idx is not None:
            used = rows != self.padding_idx
            rows, grad = rows[used], grad[used]
        np.add.at(buffer, rows, grad)
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class _Activation(Module):
    """An elementwise activation; backward from the saved input (or output)."""

    def forward(self, x: npt.ArrayLike) -> _Float:
        """x (..., any shape) -> x's shape."""
        x = F._as_float_array(x, type(self).__name__, "input")
        # np.asarray: a ufunc given a 0-d array returns a NumPy scalar, and a
        # module returns an array whatever the input's rank
        out = np.asarray(self._apply(x))
        self._save(x, out)
        return out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        x, out = self._saved
        return np.asarray(self._derivative(self._check_grad(grad, x.shape, x.dtype), x, out))

    def _apply(self, x: _Array) -> _Array:
        raise NotImplementedError

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        raise NotImplementedError


class ReLU(_Activation):
    """max(x, 0), elementwise."""

    def _apply(self, x: _Array) -> _Array:
        return F.relu(x)

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        return F.relu_backward(grad, x)


class GELU(_Activation):
    """x * Phi(x) (approximate="none") or its tanh approximation ("tanh")."""

    def __init__(self, approximate: Literal["none", "tanh"] = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate: Literal["none", "tanh"] = approximate

    def _apply(self, x: _Array) -> _Array:
        return F.gelu(x, self.approximate)

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        return F.gelu_backward(grad, x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(_Activation):
    """x * sigmoid(x), elementwise."""

    def _apply(self, x: _Array) -> _Array:
        return F.silu(x)

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        return F.silu_backward(grad, x)


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), elementwise."""

    def _apply(self, x: _Array) -> _Array:
        return F.sigmoid(x)

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        return grad * out * (1 - out)                     # s' = s (1 - s)


class Tanh(_Activation):
    """tanh(x), elementwise."""

    def _apply(self, x: _Array) -> _Array:
        return np.tanh(x)

    def _derivative(self, grad: _Array, x: _Array, out: _Array) -> _Array:
        return grad * (1 - out * out)                     # tanh' = 1 - tanh^2


def gelu_tanh(x: npt.ArrayLike, *, out: _Float | None = None) -> _Float:
    """GELU's tanh approximation, F.gelu(x, "tanh").

    A named module-level function rather than a lambda: layers store their
    activation, and pickle (and so multiprocessing, and saving a whole model)
    finds a function by its qualified name, which a lambda does not have.
    """
    return F.gelu(x, "tanh", out=out)


def gelu_tanh_backward(grad: npt.ArrayLike, x: npt.ArrayLike) -> _Float:
    """The gradient of gelu_tanh, F.gelu_backward(grad, x, "tanh")."""
    return F.gelu_backward(grad, x, "tanh")


def sigmoid_backward(grad: _Array, x: npt.ArrayLike) -> _Float:
    s = F.sigmoid(x)
    return grad * s * (1 - s)


_ACTIVATIONS: dict[str, Callable[..., Any]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu, "sigmoid": F.sigmoid}
# each named activation's gradient, (grad, x) -> grad * f'(x), keyed by the function
ACTIVATION_BACKWARDS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.relu: F.relu_backward, F.gelu: F.gelu_backward, gelu_tanh: gelu_tanh_backward,
    F.silu: F.silu_backward, F.sigmoid: sigmoid_backward}
# the ones F.linear can apply in the same pass as its bias; keyed by the
# functions themselves, which unpickling resolves by name to these same objects
LINEAR_ACTIVATION_NAMES: dict[Callable[..., Any], str] = {
    _ACTIVATIONS[name]: name for name in ("relu", "gelu", "gelu_tanh", "silu")}


def get_activation(activation: str | Callable[..., Any]) -> Callable[..., Any]:
    """A function for "relu", "gelu", "gelu_tanh", "silu" or "sigmoid"; a
    callable is returned as it is. A layer keeps what this returns, so a layer
    given a lambda or a nested function cannot be pickled: pass a name, a
    module-level function or a Module (nn.GELU("tanh")) instead."""
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{', '.join(_ACTIVATIONS)} or a callable") from None
