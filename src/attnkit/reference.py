"""attnkit.reference: what every kernel computes, in plain NumPy.

This is the oracle the kernels are tested against, and the place to read the
maths without the C. Every function computes in `dtype` (float64 unless asked
otherwise: np.longdouble gives a reference for float64 kernels, np.float32
shows what a naive float32 computation gets) and returns an array of `dtype`.
Nothing here is fast, and nothing here is clever.

Shape names: x is any shape (...); a reduced axis has length C.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, TypeVar

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    _Float = npt.NDArray[Any]     # of `dtype`
    _Axis = SupportsIndex | Sequence[SupportsIndex] | None
    # `dtype` is a scalar type (np.float32, np.float64, np.longdouble), which
    # some functions call to round a constant: not a string or an np.dtype
    _Scalar = npt.DTypeLike

_Func = TypeVar("_Func", bound=Callable[..., Any])


def _cast(value: Any, dtype: Any) -> Any:
    """value as a NumPy scalar of dtype, which may be given as any NumPy
    accepts (np.float32, "float32", np.dtype("f4"))."""
    return np.dtype(dtype).type(value)


def _seed_for(dropout_p: float, dropout_seed: int | None, func: str) -> int:
    if dropout_seed is None:
        raise ValueError(f"{func}: dropout_p={dropout_p} needs dropout_seed (the hash's seed, "
                         "as attnkit's kernel was given it); got None")
    return dropout_seed

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention",
           "dropout_keep_mask", "linear", "relu", "sigmoid", "gelu", "silu", "batch_norm",
           "multi_head_attention", "softmax_backward", "log_softmax_backward", "layer_norm_backward",
           "rms_norm_backward", "relu_backward", "gelu_backward", "silu_backward",
           "bias_activation_backward", "adam_step", "dropout"]


def _ieee(func: _Func) -> _Func:
    """Let infinities and NaNs follow IEEE arithmetic without warnings: the
    reference must give the answer for inputs like [inf, 1], not complain."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature


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
def softmax(x: npt.ArrayLike, axis: _Axis = -1, where: npt.ArrayLike | None = None, *,
            dtype: _Scalar = np.float64) -> _Float:
    """exp(x - max) / sum(exp(x - max)) along axis (int, tuple or None).

    x of any shape (...), where broadcast to it. Elements where `where` is
    False count as -inf. A slice with nothing to attend to gives 0; a NaN
    makes its slice NaN.
    """
    x = _masked(x, where, dtype)                                 # (...)
    e, _ = _shifted_exp(x, axis)                                 # (...)
    s = np.sum(e, axis=axis, keepdims=True)                      # (..., 1, ...) in [1, C], or 0
    return np.where(s == 0, 0, e / s).astype(dtype)              # (...)


@_ieee
def log_softmax(x: npt.ArrayLike, axis: _Axis = -1, where: npt.ArrayLike | None = None, *,
                dtype: _Scalar = np.float64) -> _Float:
    """(x - max) - log(sum(exp(x - max))) along axis; -inf where softmax is 0."""
    x = _masked(x, where, dtype)                                 # (...)
    e, m = _shifted_exp(x, axis)                                 # (...), (..., 1, ...)
    s = np.sum(e, axis=axis, keepdims=True)                      # (..., 1, ...)
    return np.where(s == 0, -np.inf, (x - m) - np.log(s)).astype(dtype)


def _kept(where, shape):
    """where broadcast to shape, or all True."""
    return np.ones(shape, bool) if where is None else np.broadcast_to(where, shape)


@_ieee
def softmax_backward(grad: npt.ArrayLike, y: npt.ArrayLike, axis: _Axis = -1,
                     where: npt.ArrayLike | None = None, *,
                     dtype: _Scalar = np.float64) -> _Float:
    """dx = y * (grad - sum(grad * y)) along axis, y = softmax's output; the
    sum over kept elements. Masked-out elements, and slices with nothing
    kept, get 0."""
    g = np.asarray(grad, dtype)                                  # (...)
    y = np.asarray(y, dtype)                                     # (...)
    kept = _kept(where, y.shape)                                 # (...) bool
    s = np.sum(np.where(kept, g * y, 0), axis=axis, keepdims=True)   # (..., 1, ...)
    return np.where(kept, y * (g - s), 0).astype(dtype)


@_ieee
def log_softmax_backward(grad: npt.ArrayLike, y: npt.ArrayLike, axis: _Axis = -1,
                         where: npt.ArrayLike | None = None, *,
                         dtype: _Scalar = np.float64) -> _Float:
    """dx = grad - exp(y) * sum(grad) along axis, y = log_softmax's output; the
    sum over kept elements. Masked-out elements, and slices with nothing kept
    (y all -inf), get 0."""
    g = np.asarray(grad, dtype)                                  # (...)
    y = np.asarray(y, dtype)                                     # (...)
    kept = _kept(where, y.shape)
    s = np.sum(np.where(kept, g, 0), axis=axis, keepdims=True)   # (..., 1, ...)
    live = np.max(np.where(kept, y, -np.inf), axis=axis, keepdims=True) > -np.inf
    live = live | np.isnan(np.max(np.where(kept, y, -np.inf), axis=axis, keepdims=True))
    return np.where(kept & live, g - np.exp(y) * s, 0).astype(dtype)


def _trailing_axes(x, normalized_shape):
    shape = (normalized_shape,) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    assert x.shape[x.ndim - len(shape):] == shape, (x.shape, shape)
    return tuple(range(x.ndim - len(shape), x.ndim))


@_ieee
def layer_norm(x: npt.ArrayLike, normalized_shape: int | tuple[int, ...],
               weight: npt.ArrayLike | None = None, bias: npt.ArrayLike | None = None,
               eps: float = 1e-5, *, dtype: _Scalar = np.float64) -> _Float:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dimensions:
    x (..., *normalized_shape), weight and bias of normalized_shape or None.

    var is the biased variance (divided by C, not C - 1), as in PyTorch.
    """
    x = np.asarray(x, dtype=dtype)                               # (..., *normalized_shape)
    axes = _trailing_axes(x, normalized_shape)
    if x.size == 0:
        return x.copy()                                          # nothing to normalise
    mean = np.mean(x, axis=axes, keepdims=True)                  # (..., 1, ..., 1)
    var = np.mean((x - mean) ** 2, axis=axes, keepdims=True)     # (..., 1, ..., 1)
    y = (x - mean) / np.sqrt(var + _cast(eps, dtype))        # (..., *normalized_shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=dtype)                  # weight: normalized_shape
    if bias is not None:
        y = y + np.asarray(bias, dtype=dtype)                    # bias: normalized_shape
    return y.astype(dtype)


@_ieee
def rms_norm(x: npt.ArrayLike, normalized_shape: int | tuple[int, ...],
             weight: npt.ArrayLike | None = None, eps: float | None = None, *,
             dtype: _Scalar = np.float64) -> _Float:
    """x / sqrt(mean(x**2) + eps) * weight over the trailing dimensions: x
    (..., *normalized_shape), weight of normalized_shape or None.

    eps=None is the machine epsilon of x's own dtype, as in PyTorch.
    """
    if eps is None:
        eps = np.finfo(np.asarray(x).dtype).eps
    x = np.asarray(x, dtype=dtype)                               # (..., *normalized_shape)
    axes = _trailing_axes(x, normalized_shape)
    if x.size == 0:
        return x.copy()
    mean_square = np.mean(x * x, axis=axes, keepdims=True)       # (..., 1, ..., 1)
    y = x / np.sqrt(mean_square + _cast(eps, dtype))         # (..., *normalized_shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=dtype)
    return y.astype(dtype)


@_ieee
def layer_norm_backward(grad: npt.ArrayLike, x: npt.ArrayLike, mean: npt.ArrayLike,
                        rstd: npt.ArrayLike, normalized_shape: int | tuple[int, ...],
                        weight: npt.ArrayLike | None = None, *,
                        dtype: _Scalar = np.float64) -> tuple[_Float, _Float, _Float]:
    """(dx, dweight, dbias) of layer_norm, from the forward's mean and rstd
    (shape x.shape[:-k] + (1,) * k):

      xhat = (x - mean) * rstd,  g = grad * weight
      dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
      dweight = sum over rows of grad * xhat,  dbias = sum over rows of grad
    """
    x = np.asarray(x, dtype)                                     # (..., *normalized_shape)
    g0 = np.asarray(grad, dtype)                                 # (..., *normalized_shape)
    axes = _trailing_axes(x, normalized_shape)
    k = len(axes)
    lead = x.shape[: x.ndim - k]
    mean = np.asarray(mean, dtype).reshape(lead + (1,) * k)      # (..., 1, ..., 1)
    rstd = np.asarray(rstd, dtype).reshape(lead + (1,) * k)
    xhat = (x - mean) * rstd
    g = g0 if weight is None else g0 * np.asarray(weight, dtype)
    rows = tuple(range(x.ndim - k))
    if x.size == 0:
        dx = np.zeros_like(x)
    else:
        dx = rstd * (g - np.mean(g, axis=axes, keepdims=True)
                     - xhat * np.mean(g * xhat, axis=axes, keepdims=True))
    dweight = np.sum(g0 * xhat, axis=rows)                       # normalized_shape
    dbias = np.sum(g0, axis=rows)                                # normalized_shape
    return dx.astype(dtype), dweight.astype(dtype), dbias.astype(dtype)


@_ieee
def rms_norm_backward(grad: npt.ArrayLike, x: npt.ArrayLike, rstd: npt.ArrayLike,
                      normalized_shape: int | tuple[int, ...], weight: npt.ArrayLike | None = None,
                      *, dtype: _Scalar = np.float64) -> tuple[_Float, _Float]:
    """(dx, dweight) of rms_norm, grad and x (..., *normalized_shape), rstd
    x.shape[:-k] + (1,) * k: xhat = x * rstd, g = grad * weight,
    dx = rstd * (g - xhat * mean(g * xhat)), dweight = sum over rows of grad * xhat."""
    x = np.asarray(x, dtype)
    g0 = np.asarray(grad, dtype)
    axes = _trailing_axes(x, normalized_shape)
    k = len(axes)
    rstd = np.asarray(rstd, dtype).reshape(x.shape[: x.ndim - k] + (1,) * k)
    xhat = x * rstd
    g = g0 if weight is None else g0 * np.asarray(weight, dtype)
    dx = np.zeros_like(x) if x.size == 0 else rstd * (g - xhat * np.mean(g * xhat, axis=axes, keepdims=True))
    dweight = np.sum(g0 * xhat, axis=tuple(range(x.ndim - k)))
    return dx.astype(dtype), dweight.astype(dtype)


def _mix32(x):
    """The 32-bit integer hash attnkit's kernels drop attention weights by."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def dropout_keep_mask(seed: int, shape: tuple[int, ...], p: float) -> npt.NDArray[np.bool_]:
    """Which weights dropout keeps: a bool array of shape (*batch, H, L, S).

    Element (b, h, i, j), with bh = b*H + h counted over the flattened batch,
    is kept when the top 24 bits of
        mix32(mix32(mix32(mix32(seed) ^ bh) ^ i) ^ j)
    read as a fraction are >= p. A hash of the position, not a stream of
    random numbers, so the same seed drops the same weights in any order.
    """
    *lead, L, S = shape
    bh = np.arange(int(np.prod(lead, dtype=np.int64)), dtype=np.uint32)      # (BH)
    i = np.arange(L, dtype=np.uint32)                                        # (L)
    j = np.arange(S, dtype=np.uint32)                                        # (S)
    with np.errstate(over="ignore"):
        key = _mix32(_mix32(np.uint32(seed)) ^ bh)                           # (BH)
        key = _mix32(key[:, None] ^ i[None, :])                              # (BH, L)
        h = _mix32(key[:, :, None] ^ j[None, None, :])                       # (BH, L, S)
    threshold = np.ceil(p * 16777216.0)
    return ((h >> np.uint32(8)) >= threshold).reshape(shape)


def dropout(x: npt.ArrayLike, p: float, seed: int, *, dtype: _Scalar = np.float64) -> _Float:
    """Dropout as attnkit.dropout(x, p, seed=seed) computes it: element i of
    the flattened x is kept when dropout_keep_mask's hash of (seed, bh = 0,
    row i // 4096, column i % 4096) keeps it, and kept elements are scaled by
    1 / (1 - p) (0 for p = 1), dropped ones are 0."""
    x = np.asarray(x, dtype=dtype)
    n, row = x.size, 4096
    rows = -(-n // row)
    keep = dropout_keep_mask(seed, (1, rows, row), p).reshape(-1)[:n].reshape(x.shape)
    scale = _cast(1 / (1 - p), dtype) if p < 1 else _cast(0, dtype)
    return np.where(keep, x * scale, _cast(0, dtype))


@_ieee
def scaled_dot_product_attention(query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                                 attn_mask: npt.ArrayLike | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False,
                                 causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
                                 dropout_seed: int | None = None,
                                 dtype: _Scalar = np.float64) -> tuple[_Float, _Float, _Float]:
    """softmax(q @ k^T * scale + mask) @ v, materialised, in `dtype`.

    query (..., H, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev),
    attn_mask broadcastable to (..., H, L, S): as attnkit's.

    Returns (output, weights, lse): output (..., H, L, Ev), the weights that
    multiplied v (..., H, L, S) and the log-sum-exp of each row's scores
    (..., H, L). A row with nothing to attend to has weights 0 and lse -inf.
    Dropout (dropout_p > 0) needs the seed the kernel used: the keep mask is
    dropout_keep_mask(dropout_seed, weights.shape, dropout_p).
    """
    q = np.asarray(query, dtype=dtype)                           # (..., H, L, E)
    k = np.asarray(key, dtype=dtype)                             # (..., Hkv, S, E)
    v = np.asarray(value, dtype=dtype)                           # (..., Hkv, S, Ev)
    L, S = q.shape[-2], k.shape[-2]
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        H = q.shape[-3]
        k = np.repeat(k, H // k.shape[-3], axis=-3)              # (..., H, S, E)
        v = np.repeat(v, H // v.shape[-3], axis=-3)              # (..., H, S, Ev)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0   # E = 0: every score is 0
    scores = (q @ np.swapaxes(k, -1, -2)) * _cast(scale, dtype) # (..., H, L, S)
    if is_causal:
        offset = 0 if causal_alignment == "top_left" else S - L
        visible = np.arange(S)[None, :] <= np.arange(L)[:, None] + offset   # (L, S)
        scores = np.where(visible, scores, -np.inf)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)             # False: hidden
        else:
            scores = scores + mask.astype(dtype)                 # added to the scores
    m = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)  # (..., H, L, 1)
    m = np.where(m == -np.inf, 0, m)                             # nothing to attend to
    e = np.exp(scores - m)                                       # (..., H, L, S)
    total = np.sum(e, axis=-1, keepdims=True)                    # (..., H, L, 1)
    weights = np.where(total == 0, 0, e / total)                 # (..., H, L, S)
    lse = np.where(total == 0, -np.inf, m + np.log(total))[..., 0]   # (..., H, L)
    if dropout_p > 0:
        keep = dropout_keep_mask(_seed_for(dropout_p, dropout_seed, "scaled_dot_product_attention"),
                                 weights.shape, dropout_p)
        weights = np.where(keep, weights / (1 - dropout_p) if dropout_p < 1 else 0, 0)
    out = weights @ v                                            # (..., H, L, Ev)
    return out.astype(dtype), weights.astype(dtype), lse.astype(dtype)


def _sum_to_shape(grad, shape):
    """grad summed over the dimensions it was broadcast along to reach shape."""
    lead = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


@_ieee
def scaled_dot_product_attention_backward(grad_out: npt.ArrayLike, query: npt.ArrayLike,
                                          key: npt.ArrayLike, value: npt.ArrayLike,
                                          attn_mask: npt.ArrayLike | None = None,
                                          dropout_p: float = 0.0, is_causal: bool = False, *,
                                          scale: float | None = None, enable_gqa: bool = False,
                                          causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
                                          dropout_seed: int | None = None,
                                          dtype: _Scalar = np.float64) -> tuple[_Float, _Float, _Float]:
    """(dq, dk, dv) of scaled_dot_product_attention, materialised, in `dtype`:
    grad_out (..., H, L, Ev), the rest as the forward's; dq, dk, dv of
    query's, key's and value's shapes.

    With P the weights before dropout, Z the kept pattern and ks = 1/(1-p):
        dV = (P Z ks)^T dO,   dP = (dO V^T) Z ks,
        dS = P * (dP - rowsum(P * dP)),   dQ = scale dS K,   dK = scale dS^T Q,
    then summed over whatever was broadcast (GQA's shared heads included).
    """
    q = np.asarray(query, dtype=dtype)                           # (..., H, L, E)
    k = np.asarray(key, dtype=dtype)                             # (..., Hkv, S, E)
    v = np.asarray(value, dtype=dtype)                           # (..., Hkv, S, Ev)
    g = np.asarray(grad_out, dtype=dtype)                        # (..., H, L, Ev)
    E = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(E) if E > 0 else 1.0
    _, weights, _ = scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa,
                                                 causal_alignment=causal_alignment, dtype=dtype)
    group = q.shape[-3] // k.shape[-3] if enable_gqa else 1
    k_full = np.repeat(k, group, axis=-3) if group > 1 else k    # (..., H, S, E)
    v_full = np.repeat(v, group, axis=-3) if group > 1 else v    # (..., H, S, Ev)
    p = weights                                                  # (..., H, L, S)
    kept = np.ones_like(p)
    if dropout_p > 0:
        keep = dropout_keep_mask(_seed_for(dropout_p, dropout_seed,
                                           "scaled_dot_product_attention_backward"),
                                 np.broadcast_shapes(p.shape, g.shape[:-1] + (1,)),
                                 dropout_p)
        kept = np.where(keep, 1 / (1 - dropout_p) if dropout_p < 1 else 0, 0)
    dv = np.swapaxes(p * kept, -1, -2) @ g                       # (..., H, S, Ev)
    dp = (g @ np.swapaxes(v_full, -1, -2)) * kept                # (..., H, L, S)
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))       # (..., H, L, S)
    dq = (ds @ k_full) * scale                                   # (..., H, L, E)
    dk = (np.swapaxes(ds, -1, -2) @ q) * scale                   # (..., H, S, E)
    if group > 1:   # each key/value head collects its group's query heads
        dk = dk.reshape(dk.shape[:-3] + (k.shape[-3], group) + dk.shape[-2:]).sum(axis=-3)
        dv = dv.reshape(dv.shape[:-3] + (v.shape[-3], group) + dv.shape[-2:]).sum(axis=-3)
    return (_sum_to_shape(dq, q.shape).astype(dtype), _sum_to_shape(dk, k.shape).astype(dtype),
            _sum_to_shape(dv, v.shape).astype(dtype))


# ---------------------------------------------------------------------------
# The pieces of layers

def linear(x: npt.ArrayLike, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None, *,
           dtype: _Scalar = np.float64) -> _Float:
    """x (..., in) @ weight (out, in).T + bias (out) -> (..., out)."""
    y = np.asarray(x, dtype) @ np.asarray(weight, dtype).T       # (..., out)
    return y if bias is None else y + np.asarray(bias, dtype)


def relu(x: npt.ArrayLike, *, dtype: _Scalar = np.float64) -> _Float:
    """max(x, 0) for x of any shape (...)."""
    return np.maximum(np.asarray(x, dtype), 0)


@_ieee
def sigmoid(x: npt.ArrayLike, *, dtype: _Scalar = np.float64) -> _Float:
    """1 / (1 + exp(-x)) for x of any shape (...)."""
    return 1 / (1 + np.exp(-np.asarray(x, dtype)))


def gelu(x: npt.ArrayLike, approximate: Literal["none", "tanh"] = "none", *,
         dtype: _Scalar = np.float64) -> _Float:
    """x * Phi(x) with Phi(x) = (1 + erf(x / sqrt(2))) / 2, erf from Python's
    math module element by element; or the tanh approximation."""
    x = np.asarray(x, dtype)
    if approximate == "tanh":
        inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1 + np.tanh(inner))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(dtype)


def silu(x: npt.ArrayLike, *, dtype: _Scalar = np.float64) -> _Float:
    """x * sigmoid(x) for x of any shape (...)."""
    x = np.asarray(x, dtype)
    return x * sigmoid(x, dtype=dtype)


def relu_backward(grad: npt.ArrayLike, x: npt.ArrayLike, *,
                  dtype: _Scalar = np.float64) -> _Float:
    """grad where x > 0, 0 where x <= 0 (PyTorch's), NaN where x is NaN."""
    x = np.asarray(x, dtype)
    return np.where(x > 0, np.asarray(grad, dtype), np.where(np.isnan(x), x, 0)).astype(dtype)


@_ieee
def gelu_backward(grad: npt.ArrayLike, x: npt.ArrayLike,
                  approximate: Literal["none", "tanh"] = "none", *,
                  dtype: _Scalar = np.float64) -> _Float:
    """grad * gelu'(x): Phi(x) + x phi(x), or the tanh approximation's
    0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) u', u = sqrt(2/pi) (x + 0.044715 x^3)."""
    x = np.asarray(x, dtype)
    g = np.asarray(grad, dtype)
    if approximate == "tanh":
        k0 = np.sqrt(_cast(2, dtype) / _cast(np.pi, dtype))
        u = k0 * (x + _cast(0.044715, dtype) * x**3)
        t = np.tanh(u)
        du = k0 * (1 + 3 * _cast(0.044715, dtype) * x**2)
        return (g * (_cast(0.5, dtype) * (1 + t) + _cast(0.5, dtype) * x * (1 - t * t) * du)).astype(dtype)
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    cdf = (0.5 * erfc(-x / np.sqrt(2))).astype(dtype)          # Phi(x), the tails kept exact
    pdf = np.exp(-x * x / 2) / np.sqrt(_cast(2, dtype) * _cast(np.pi, dtype))
    return (g * (cdf + x * pdf)).astype(dtype)


@_ieee
def silu_backward(grad: npt.ArrayLike, x: npt.ArrayLike, *,
                  dtype: _Scalar = np.float64) -> _Float:
    """grad * s (1 + x (1 - s)), s = sigmoid(x)."""
    x = np.asarray(x, dtype)
    s = sigmoid(x, dtype=dtype)
    return (np.asarray(grad, dtype) * s * (1 + x * (1 - s))).astype(dtype)


def bias_activation_backward(grad: npt.ArrayLike, x: npt.ArrayLike,
                             bias: npt.ArrayLike | None = None, activation: str | None = None, *,
                             dtype: _Scalar = np.float64) -> tuple[_Float, _Float]:
    """(dx, dbias) of activation(x + bias): dx = grad * activation'(x + bias),
    dbias = dx summed over every row (x.shape[-1],)."""
    h = np.asarray(x, dtype)
    if bias is not None:
        h = h + np.asarray(bias, dtype)
    g = np.asarray(grad, dtype)
    if activation is None:
        dx = g.copy()
    elif activation == "relu":
        dx = relu_backward(g, h, dtype=dtype)
    elif activation in ("gelu", "gelu_tanh"):
        dx = gelu_backward(g, h, "tanh" if activation == "gelu_tanh" else "none", dtype=dtype)
    elif activation == "silu":
        dx = silu_backward(g, h, dtype=dtype)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return dx, dx.reshape(-1, h.shape[-1]).sum(axis=0).astype(dtype)


def batch_norm(x: npt.ArrayLike, running_mean: npt.ArrayLike | None = None,
               running_var: npt.ArrayLike | None = None, weight: npt.ArrayLike | None = None,
               bias: npt.ArrayLike | None = None, training: bool = True, eps: float = 1e-5, *,
               dtype: _Scalar = np.float64) -> _Float:
    """x (N, C) or (N, C, L): normalised per channel by the batch's mean and
    biased variance (training) or by the running statistics; running_mean,
    running_var, weight and bias (C) or None."""
    x = np.asarray(x, dtype)
    axes = (0,) if x.ndim == 2 else (0, 2)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)                    # (C), (C)
    else:
        mean, var = np.asarray(running_mean, dtype), np.asarray(running_var, dtype)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * np.asarray(weight, dtype).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype).reshape(shape)
    return y


def multi_head_attention(query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                         state: Mapping[str, npt.ArrayLike], num_heads: int,
                         key_padding_mask: npt.ArrayLike | None = None,
                         attn_mask: npt.ArrayLike | None = None, is_causal: bool = False,
                         batch_first: bool = False, add_zero_attn: bool = False, *,
                         dtype: _Scalar = np.float64) -> tuple[_Float, _Float]:
    """PyTorch's multi-head attention, composed from linear and
    scaled_dot_product_attention, with the parameters of a state dict
    (in_proj_weight or q/k/v_proj_weight, in_proj_bias, bias_k, bias_v,
    out_proj.weight, out_proj.bias). Masks have MultiheadAttention's meaning:
    True = hidden. query (L, N, E), key (S, N, kdim), value (S, N, vdim), or
    (N, L, E) etc. with batch_first, or unbatched (L, E); key_padding_mask
    (N, S); attn_mask (L, S) or (N*H, L, S). Returns (output, like query,
    weights (N, H, L, S))."""
    p = {k: np.asarray(v, dtype) for k, v in state.items()}
    q, k, v = (np.asarray(a, dtype) for a in (query, key, value))
    unbatched = q.ndim == 2
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    elif not batch_first:
        q, k, v = (a.swapaxes(0, 1) for a in (q, k, v))                   # (N, L, features)
    E = q.shape[-1]
    if "in_proj_weight" in p:
        Wq, Wk, Wv = np.split(p["in_proj_weight"], 3)
    else:
        Wq, Wk, Wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    kv = Wk.shape[0]
    b = p.get("in_proj_bias")
    bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:E + kv], b[E + kv:])
    qp, kp, vp = linear(q, Wq, bq, dtype=dtype), linear(k, Wk, bk, dtype=dtype), linear(v, Wv, bv, dtype=dtype)
    N, L, S = q.shape[0], q.shape[1], k.shape[1]
    hidden: npt.NDArray[Any] | None = np.zeros((N, 1, 1, S), bool)          # (N, 1, 1, S) True = hidden
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask)
        kpm = kpm[None] if unbatched else kpm
        hidden = kpm.reshape(N, 1, 1, S) if kpm.dtype == np.bool_ else None
        added = None if kpm.dtype == np.bool_ else kpm.reshape(N, 1, 1, S).astype(dtype)
    else:
        added = None
    scores_bias = np.zeros((N, 1, 1, S), dtype) if added is None else added  # (N, 1, 1, S)
    if hidden is not None:
        scores_bias = np.where(hidden, -np.inf, scores_bias)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        m = m.reshape(N, num_heads, L, S) if m.ndim == 3 else m
        scores_bias = scores_bias + (np.where(m, -np.inf, 0.0) if m.dtype == np.bool_ else m.astype(dtype))
    H, d = num_heads, E // num_heads
    Hkv = kv // d
    if "bias_k" in p:
        kp = np.concatenate([kp, np.broadcast_to(p["bias_k"], (N, 1, kv))], axis=1)
        vp = np.concatenate([vp, np.broadcast_to(p["bias_v"], (N, 1, kv))], axis=1)
        scores_bias = np.concatenate([np.broadcast_to(scores_bias, scores_bias.shape[:-1] + (S,)),
                                      np.zeros(scores_bias.shape[:-1] + (1,), dtype)], axis=-1)
    qh = qp.reshape(N, L, H, d).transpose(0, 2, 1, 3)                       # (N, H, L, d)
    kh = kp.reshape(N, -1, Hkv, d).transpose(0, 2, 1, 3)                    # (N, Hkv, S', d)
    vh = vp.reshape(N, -1, Hkv, d).transpose(0, 2, 1, 3)                    # (N, Hkv, S', d)
    if add_zero_attn:
        kh = np.concatenate([kh, np.zeros((N, Hkv, 1, d), dtype)], axis=2)
        vh = np.concatenate([vh, np.zeros((N, Hkv, 1, d), dtype)], axis=2)
        scores_bias = np.concatenate([np.broadcast_to(scores_bias, scores_bias.shape[:-1] + (kh.shape[2] - 1,)),
                                      np.zeros(scores_bias.shape[:-1] + (1,), dtype)], axis=-1)
    heads, weights, _ = scaled_dot_product_attention(qh, kh, vh, attn_mask=scores_bias,
                                                     is_causal=is_causal, enable_gqa=Hkv != H,
                                                     dtype=dtype)                # (N, H, L, d)
    merged = heads.transpose(0, 2, 1, 3).reshape(N, L, E)                   # (N, L, E): heads side by side
    out = linear(merged, p["out_proj.weight"], p.get("out_proj.bias"), dtype=dtype)
    if unbatched:
        return out[0], weights[0]
    return (out if batch_first else out.swapaxes(0, 1)), weights


def adam_step(param: npt.ArrayLike, grad: npt.ArrayLike, exp_avg: npt.ArrayLike,
              exp_avg_sq: npt.ArrayLike, max_exp_avg_sq: npt.ArrayLike | None = None, *, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float, step: int,
              decoupled: bool) -> tuple[_Float, _Float, _Float, _Float | None]:
    """Adam's update (AdamW's with decoupled=True) as torch.optim's
    single-tensor implementation computes it, operation for operation in
    param's dtype, each scalar rounded to it first: the oracle of the C
    kernel (csrc/optim.c), which must agree bit for bit. `step` counts this
    update (1 for the first). grad and the moments have param's shape (any).
    Returns new arrays (param, exp_avg, exp_avg_sq, max_exp_avg_sq or None);
    nothing given is changed.
    """
    p, g, m, v = (np.array(a) for a in (param, grad, exp_avg, exp_avg_sq))
    vmax = None if max_exp_avg_sq is None else np.array(max_exp_avg_sq)
    beta1, beta2 = betas
    scalar = p.dtype.type
    if weight_decay != 0:
        if decoupled:
            p *= 1 - lr * weight_decay                  # before the gradient step
        else:
            g = p * weight_decay + g
    # m = lerp(m, g, 1 - beta1) in torch.lerp's two forms (the one for a
    # weight >= 0.5 is the more accurate there), the weight in p's dtype
    weight = scalar(1 - beta1)
    t = g - m
    if abs(weight) < 0.5:
        m += t * weight
    else:
        m = g - t * (scalar(1) - weight)
    v = v * beta2 + (g * (1 - beta2)) * g           # addcmul's order
    if vmax is not None:
        vmax = np.maximum(vmax, v)
    # the bias corrections in Python floats, as PyTorch computes them
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(v if vmax is None else vmax) / (1 - beta2 ** step) ** 0.5 + eps
    p += (m * -step_size) / denom                   # addcdiv's order
    return p, m, v, vmax
