"""Position information for attention, which by itself ignores order.

  sinusoidal  added to the embeddings: PE[p, 2i] = sin(p / base^(2i/d)),
              PE[p, 2i+1] = cos(p / base^(2i/d))          (Vaswani et al.)
  learned     added to the embeddings: a trained table of positions
  rotary      applied to queries and keys: each pair of features rotated by
              an angle proportional to the position, so q_m . k_n depends on
              m - n only                                   (RoPE, Su et al.)
  ALiBi       added to the scores: -slope_h * distance, a slope per head
                                                            (Press et al.)

One rule for positions everywhere here: an `offset` (the position of the
first row) is an int >= 0, anything else is refused rather than read modulo
the table (a negative slice start would wrap to the end of it). Positions
past a table's max_length are computed by the sinusoidal encoding and
refused by the learned one, which has no rows for them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import functional as F
from . import init
from .layers import _float_dtype, _positive
from .module import Module

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]

__all__ = ["sinusoidal_positional_encoding", "SinusoidalPositionalEncoding",
           "LearnedPositionalEmbedding", "RotaryEmbedding", "alibi_slopes", "alibi_bias"]


def _count(value: object, owner: str, name: str) -> int:
    """A length as an int >= 0."""
    value = F._index(value, owner, name)
    if value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
    return value


def _offset(offset: object, length: int, owner: str) -> int:
    """The first row's position as an int >= 0."""
    offset = F._index(offset, owner, "offset")
    if offset < 0:
        raise ValueError(f"{owner}: offset must be >= 0, got offset {offset} for a sequence "
                         f"of length {length}")
    return offset


def sinusoidal_positional_encoding(length: int, dim: int, base: float = 10000.0, *, offset: int = 0,
                                   dtype: npt.DTypeLike = np.float32) -> _Float:
    """(length, dim): row p is the encoding of position offset + p. Computed in
    float64 and rounded once. length and offset are ints >= 0."""
    owner = "sinusoidal_positional_encoding"
    length, dim = _count(length, owner, "length"), _positive(dim, "dim", owner)
    offset = _offset(offset, length, owner)
    position = np.arange(offset, offset + length, dtype=np.float64)[:, None]    # (length, 1)
    frequency = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)       # (ceil(dim/2))
    angle = position * frequency                                               # (length, ceil(dim/2))
    pe = np.empty((length, dim), np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : dim // 2])
    return pe.astype(dtype)


def _sequence_input(layer: Module, x: npt.ArrayLike, dim: int) -> _Array:
    x = F._as_float_array(x, type(layer).__name__, "input")
    if x.ndim < 2 or x.shape[-1] != dim:
        raise ValueError(f"{type(layer).__name__}: input must be (..., length, {dim}), got {x.shape}")
    return x


class SinusoidalPositionalEncoding(Module):
    """Adds the sinusoidal encoding to x (..., length, dim) (positions from
    `offset`, an int >= 0, for decoding one step at a time). Positions past
    max_length are computed rather than refused: the table is a cache, not a
    limit. No parameters."""

    def __init__(self, dim: int, max_length: int = 4096, base: float = 10000.0, *,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.dim = _positive(dim, "dim", "SinusoidalPositionalEncoding")
        self.base = F._real(base, "SinusoidalPositionalEncoding", "base")
        self.max_length = _count(max_length, "SinusoidalPositionalEncoding", "max_length")
        self._dtype = _float_dtype(dtype)
        # kept in float64 and rounded to the input's dtype when added
        self._table = sinusoidal_positional_encoding(self.max_length, self.dim, self.base,
                                                     dtype=np.float64)

    def forward(self, x: npt.ArrayLike, offset: int = 0) -> _Float:
        """x (..., length, dim) -> x's shape."""
        x = _sequence_input(self, x, self.dim)
        L = x.shape[-2]
        offset = _offset(offset, L, "SinusoidalPositionalEncoding")
        if offset + L > len(self._table):
            table = sinusoidal_positional_encoding(L, self.dim, self.base, offset=offset, dtype=x.dtype)
        else:
            table = self._table[offset:offset + L].astype(x.dtype, copy=False)
        self._save(x.shape, x.dtype)
        return x + table

    def _backward(self, grad_output: npt.ArrayLike) -> _Array:
        """The gradient passes through to x unchanged (the table is constant)."""
        shape, dtype = self._saved
        return self._check_grad(grad_output, shape, dtype)


class LearnedPositionalEmbedding(Module):
    """Adds weight[offset : offset + length] to x (..., length, dim), offset
    an int >= 0; positions past max_length are refused (no row was trained
    for them). weight (max_length, dim) starts N(0, 1), as an Embedding's."""

    weight: _Array

    def __init__(self, max_length: int, dim: int, *, dtype: npt.DTypeLike = np.float32,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.max_length = _positive(max_length, "max_length", "LearnedPositionalEmbedding")
        self.dim = _positive(dim, "dim", "LearnedPositionalEmbedding")
        self.register_parameter("weight", init.normal_(np.empty((self.max_length, self.dim),
                                                                _float_dtype(dtype)), rng=rng))

    def forward(self, x: npt.ArrayLike, offset: int = 0) -> _Float:
        """x (..., length, dim) -> x's shape."""
        x = _sequence_input(self, x, self.dim)
        L = x.shape[-2]
        offset = _offset(offset, L, "LearnedPositionalEmbedding")
        if offset + L > self.max_length:
            raise ValueError(f"LearnedPositionalEmbedding: positions {offset}..{offset + L - 1} "
                             f"(offset {offset}, length {L}) are beyond the {self.max_length} "
                             f"it was made for")
        out = x + self.weight[offset:offset + L]
        self._save(offset, x.shape, x.dtype, out.dtype)
        return out

    def _backward(self, grad_output: npt.ArrayLike) -> _Array:
        """The gradient passes through to x; weight rows offset .. offset + L - 1
        get it summed over the leading (batch) dimensions."""
        offset, shape, x_dtype, dtype = self._saved
        grad = self._check_grad(grad_output, shape, dtype)
        buffer = self._grad_buffer("weight")
        L = shape[-2]
        if buffer is not False and L:
            buffer[offset:offset + L] += grad.reshape(-1, L, self.dim).sum(axis=0)
        return grad.astype(x_dtype, copy=False)


class RotaryEmbedding(Module):
    """Rotary position embedding of queries or keys (..., length, head_dim).

    Feature pairs (x_j, x_{j + d/2}) (interleaved=False, the GPT-NeoX/LLaMA
    layout) or (x_{2j}, x_{2j+1}) (interleaved=True, the paper's) are rotated
    by position * base^(-2j/d). Apply it to q and k before attention; the
    score q_m . k_n then depends on m - n only. No parameters.

    forward(x, offset=0, positions=None): the rows are at positions offset,
    offset + 1, ... (offset an int >= 0), or at `positions`, a (length,)
    array of positions >= 0. positions may be fractional (floats), as
    position interpolation uses them (Chen et al. 2023: m / scale to stretch
    the trained context); the rotation is defined for any real position.
    Negative, NaN or infinite positions are refused, as are bools."""

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        self.head_dim = _positive(head_dim, "head_dim", "RotaryEmbedding")
        if self.head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.base = F._real(base, "RotaryEmbedding", "base")
        self.interleaved = F._flag(interleaved, "RotaryEmbedding", "interleaved")

    def angles(self, positions: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(len(positions), head_dim / 2), in float64. positions as forward
        takes them: ints or floats >= 0."""
        return self._angles(self._positions(positions))

    def _angles(self, positions: npt.ArrayLike) -> npt.NDArray[np.float64]:
        inv = self.base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        return np.asarray(positions, np.float64)[:, None] * inv[None, :]

    @staticmethod
    def _positions(positions: npt.ArrayLike) -> _Array:
        positions = np.asarray(positions)
        if positions.dtype.kind not in "iuf":
            raise TypeError(f"RotaryEmbedding: positions must be ints or floats, got dtype "
                            f"{positions.dtype}")
        if positions.size and not (np.isfinite(positions).all() and positions.min() >= 0):
            bad = positions[~(np.isfinite(positions) & (positions >= 0))]
            raise ValueError(f"RotaryEmbedding: positions must be finite and >= 0, got "
                             f"{bad[:5].tolist()} among the {positions.size} given")
        return positions

    def forward(self, x: npt.ArrayLike, offset: int = 0,
                positions: npt.ArrayLike | None = None) -> _Float:
        """x (..., length, head_dim) -> x's shape; positions (length,) or None."""
        x = _sequence_input(self, x, self.head_dim)
        L = x.shape[-2]
        offset = _offset(offset, L, "RotaryEmbedding")
        if positions is None:
            positions = np.arange(offset, offset + L)
        elif offset:
            # which one would win is a guess either way
            raise ValueError(f"RotaryEmbedding: give offset ({offset}) or positions, not both")
        else:
            positions = self._positions(positions)
        if positions.shape != (L,):
            raise ValueError(f"RotaryEmbedding: positions must be ({L},), got {positions.shape}")
        angle = self._angles(positions)
        cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)   # (L, d/2)
        self._save(cos, sin, x.shape, x.dtype)
        return self._rotate(x, cos, sin)

    def _rotate(self, x: _Array, cos: _Array, sin: _Array) -> _Array:
        """Each feature pair (a, b) of x (..., L, d) rotated by the angle whose
        cosine and sine are cos, sin (L, d/2)."""
        if self.interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        ra, rb = a * cos - b * sin, a * sin + b * cos                              # (..., L, d/2)
        out = np.empty_like(x)
        if self.interleaved:
            out[..., 0::2], out[..., 1::2] = ra, rb
        else:
            out[..., : self.head_dim // 2], out[..., self.head_dim // 2:] = ra, rb
        return out

    def _backward(self, grad_output: npt.ArrayLike) -> _Array:
        """A rotation's transpose is the rotation by the opposite angle: the
        gradient's pairs rotated back (cos, -sin)."""
        cos, sin, shape, dtype = self._saved
        grad = self._check_grad(grad_output, shape, dtype)
        return self._rotate(grad, cos, -sin)


def alibi_slopes(num_heads: int) -> npt.NDArray[np.float64]:
    """ALiBi's slopes (num_heads,): 2^(-8/n), 2^(-16/n), ... for n heads when n is a power of
    two; otherwise those of the power of two below, then every other slope of
    the one above (the paper's recipe)."""
    num_heads = _positive(num_heads, "num_heads", "alibi_slopes")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    below = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(below)
    if below < num_heads:
        slopes += power_of_two(2 * below)[0::2][: num_heads - below]
    return np.array(slopes)


def alibi_bias(num_heads: int, query_length: int, key_length: int, *,
               dtype: npt.DTypeLike = np.float32) -> _Float:
    """(num_heads, L, S) to add to the scores (a float attn_mask): -slope_h
    times the distance between query i, at position S - L + i (the queries are
    the last L positions), and key j. Causal use adds is_causal=True with
    causal_alignment="bottom_right". L > S is refused: the first query would
    be at position S - L < 0, before any key."""
    L = _count(query_length, "alibi_bias", "query_length")
    S = _count(key_length, "alibi_bias", "key_length")
    if L > S:
        raise ValueError(f"alibi_bias: query_length ({L}) must not exceed key_length ({S}): "
                         f"the queries take the last positions of the keys, so the first query "
                         f"would be at position {S - L}, before any key")
    query_position = np.arange(S - L, S)[:, None]                               # (L, 1)
    distance = np.abs(query_position - np.arange(S)[None, :])                   # (L, S)
    return (-alibi_slopes(num_heads)[:, None, None] * distance).astype(dtype)
