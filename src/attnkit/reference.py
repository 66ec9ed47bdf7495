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

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention",
           "dropout_keep_mask"]


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


def _mix32(x):
    """The 32-bit integer hash attnkit's kernels drop attention weights by."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def dropout_keep_mask(seed, shape, p):
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


@_ieee
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, *, scale=None, enable_gqa=False,
                                 causal_alignment="top_left", dropout_seed=None,
                                 dtype=np.float64):
    """softmax(q @ k^T * scale + mask) @ v, materialised, in `dtype`.

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
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * dtype(scale)         # (..., H, L, S)
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
        keep = dropout_keep_mask(dropout_seed, weights.shape, dropout_p)
        weights = np.where(keep, weights / (1 - dropout_p) if dropout_p < 1 else 0, 0)
    out = weights @ v                                            # (..., H, L, Ev)
    return out.astype(dtype), weights.astype(dtype), lse.astype(dtype)
