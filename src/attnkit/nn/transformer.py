"""Transformer encoder and decoder layers and stacks, as PyTorch's
(nn.TransformerEncoderLayer and friends): same arguments, same submodule
names, so their state dicts load.

    encoder layer, norm_first=False (post-norm, the original):
        x = norm1(x + dropout1(self_attn(x, x, x)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))
    norm_first=True (pre-norm):
        x = x + dropout1(self_attn(norm1(x), ...))
        x = x + dropout2(feed_forward(norm2(x)))
    the decoder layer adds, between the two, cross-attention to the encoder's
    output ("memory"): multihead_attn(x, memory, memory) with norm2, and its
    feed-forward block uses norm3.

In eval mode a layer takes the fused paths (bias, activation and residual in
the products' own passes). In training mode it calls each child in turn, so
that backward can call each child's backward in reverse: a layer's gradient is
its children's, chained, and their parameters' gradients land in their grads().
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from .. import functional as F
from .attention import KVCache, MultiHeadAttention
from .layers import (
    ACTIVATION_BACKWARDS,
    LINEAR_ACTIVATION_NAMES,
    Dropout,
    LayerNorm,
    Linear,
    get_activation,
)
from .module import Module, ModuleList

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]
    _ActivationArg = str | Callable[..., Any]

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerDecoder"]


class _FeedForward:
    """linear2(dropout(activation(linear1(x)))) and its residual, shared by both layers."""

    linear1: Linear
    linear2: Linear
    dropout: Dropout
    activation: Callable[..., Any]

    def _build_feed_forward(self, d_model: int, dim_feedforward: int, dropout: float,
                            activation: _ActivationArg, bias: bool, dtype: npt.DTypeLike,
                            rng: np.random.Generator | None) -> None:
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype, rng=rng)
        self.dropout = Dropout(dropout, rng=rng)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype, rng=rng)
        self.activation = get_activation(activation)

    def _feed_forward_hidden(self, x: npt.ArrayLike) -> _Array:
        """dropout(activation(linear1(x))): linear2's input."""
        try:
            name = LINEAR_ACTIVATION_NAMES.get(self.activation)
        except TypeError:                                   # an unhashable callable
            name = None
        if name is None:
            h = self.activation(self.linear1(x))
        else:                                               # bias and activation in one pass
            h = F.linear(x, self.linear1.weight, self.linear1.bias, activation=name)  # type: ignore[arg-type]
        return self.dropout(h)

    def _feed_forward(self, x: npt.ArrayLike) -> _Array:
        return self.linear2(self._feed_forward_hidden(x))

    # training: each child called, and its backward in reverse
    def _feed_forward_train(self, x: npt.ArrayLike) -> tuple[_Array, _Array]:
        """linear2(dropout(activation(linear1(x)))), and the activation's input
        (which the layer saves for _feed_forward_backward)."""
        pre = self.linear1(x)
        return self.linear2(self.dropout(self.activation(pre))), pre

    def _feed_forward_backward(self, grad: _Array, pre: _Array) -> _Array:
        g = self.dropout.backward(self.linear2.backward(grad))
        if isinstance(self.activation, Module):
            g = self.activation.backward(g)
        else:
            try:
                derivative = ACTIVATION_BACKWARDS.get(self.activation)
            except TypeError:                               # an unhashable callable
                derivative = None
            if derivative is None:
                raise NotImplementedError(
                    f"{type(self).__name__}.backward: the activation {self.activation!r} has no "
                    "backward; give the layer an activation by name ('relu', 'gelu', 'gelu_tanh', "
                    "'silu', 'sigmoid') or an attnkit.nn module (nn.GELU('tanh'))")
            g = derivative(g, pre)
        return self.linear1.backward(g)

    def _feed_forward_residual(self, x: npt.ArrayLike, residual: _Array, dropout: Dropout) -> _Array:
        """residual + dropout(feed_forward(x)): when that dropout is idle
        (eval mode, or p = 0) the residual is added in linear2's own pass."""
        h = self._feed_forward_hidden(x)
        if not dropout.training or dropout.p == 0.0:
            return self.linear2(h, residual=residual)
        return residual + dropout(self.linear2(h))


def _layer_extra_repr(layer: TransformerEncoderLayer | TransformerDecoderLayer) -> str:
    """extra_repr of the encoder and decoder layers: their sizes, flags and
    activation (by name: relu, gelu, gelu_tanh, silu, sigmoid; another
    callable by its __name__; a Module activation prints as a child)."""
    from .layers import _ACTIVATIONS
    attn = layer.self_attn
    parts = [f"d_model={attn.embed_dim}", f"nhead={attn.num_heads}",
             f"dim_feedforward={layer.linear1.out_features}"]
    act = layer.activation
    if not isinstance(act, Module):
        names = [name for name, f in _ACTIVATIONS.items() if f is act]
        name = names[0] if names else getattr(act, "__name__", None) or repr(act)
        parts.append(f"activation={name}")
    parts += [f"norm_first={layer.norm_first}", f"batch_first={attn.batch_first}"]
    return ", ".join(parts)


class TransformerEncoderLayer(Module, _FeedForward):
    """Self-attention then a feed-forward block, each with a residual and a
    layer norm. forward(src, src_mask=None, src_key_padding_mask=None,
    is_causal=False): src (S, N, E), (N, S, E) with batch_first, or (S, E);
    src_mask (S, S) or (N*nhead, S, S); src_key_padding_mask (N, S); masks
    as MultiHeadAttention's (True = hide). Returns src's shape."""

    def extra_repr(self) -> str:
        return _layer_extra_repr(self)

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: _ActivationArg = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, *,
                 dtype: npt.DTypeLike = np.float32, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, dtype=dtype, rng=rng)
        self._build_feed_forward(d_model, dim_feedforward, dropout, activation, bias, dtype, rng)
        self.norm_first = F._flag(norm_first, type(self).__name__, "norm_first")
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout, rng=rng)
        self.dropout2 = Dropout(dropout, rng=rng)

    def _self_attention(self, x: Any, mask: Any, key_padding_mask: Any, is_causal: bool,
                        weights: list[Any] | None = None) -> _Array:
        """dropout1(self_attn(x, x, x)); each head's weights appended to
        `weights` when it is a list."""
        out, w = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask,
                                need_weights=weights is not None, average_attn_weights=False,
                                is_causal=is_causal)
        if weights is not None:
            weights.append(w)
        return self.dropout1(out)

    @overload
    def forward(self, src: npt.ArrayLike, src_mask: npt.ArrayLike | None = None,
                src_key_padding_mask: npt.ArrayLike | None = None, is_causal: bool = False,
                need_weights: Literal[False] = False) -> _Float: ...
    @overload
    def forward(self, src: npt.ArrayLike, src_mask: npt.ArrayLike | None = None,
                src_key_padding_mask: npt.ArrayLike | None = None, is_causal: bool = False, *,
                need_weights: Literal[True]) -> tuple[_Float, _Float]: ...
    @overload
    def forward(self, src: npt.ArrayLike, src_mask: npt.ArrayLike | None = None,
                src_key_padding_mask: npt.ArrayLike | None = None, is_causal: bool = False,
                need_weights: bool = False) -> _Float | tuple[_Float, _Float]: ...
    def forward(self, src: npt.ArrayLike, src_mask: npt.ArrayLike | None = None,
                src_key_padding_mask: npt.ArrayLike | None = None, is_causal: bool = False,
                need_weights: bool = False) -> _Float | tuple[_Float, _Float]:
        """need_weights (an attnkit extension, for looking inside): also
        return the self-attention's weights, each head's, (N, H, L, L):
        (output, weights)."""
        weights: list[Any] | None = [] if F._flag(need_weights, type(self).__name__, "need_weights") else None
        if self.training:
            out = self._forward_train(src, src_mask, src_key_padding_mask, is_causal, weights)
        else:
            x = src
            if self.norm_first:
                x = x + self._self_attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal,
                                             weights)
                out = self._feed_forward_residual(self.norm2(x), x, self.dropout2)
            else:
                x = self.norm1(x + self._self_attention(x, src_mask, src_key_padding_mask, is_causal,
                                                        weights))
                out = self.norm2(self._feed_forward_residual(x, x, self.dropout2))
        return out if weights is None else (out, weights[0])

    def _forward_train(self, src: npt.ArrayLike, mask: Any, key_padding_mask: Any, is_causal: bool,
                       weights: list[Any] | None) -> _Array:
        x = F._as_float_array(src, type(self).__name__, "src")
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), mask, key_padding_mask, is_causal, weights)
            ff, pre = self._feed_forward_train(self.norm2(x))
            out = x + self.dropout2(ff)
        else:
            x = self.norm1(x + self._self_attention(x, mask, key_padding_mask, is_causal, weights))
            ff, pre = self._feed_forward_train(x)
            out = self.norm2(x + self.dropout2(ff))
        self._save(out.shape, out.dtype, pre)
        return out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        """d_src. Self-attention got src three times (query, key, value): its
        three gradients add."""
        shape, dtype, pre = self._saved
        grad = self._check_grad(grad, shape, dtype)
        if self.norm_first:       # out = x1 + ff(norm2(x1)),  x1 = src + sa(norm1(src))
            g1 = grad + self.norm2.backward(self._feed_forward_backward(self.dropout2.backward(grad), pre))
            return g1 + self.norm1.backward(self._self_attention_backward(g1))
        g = self.norm2.backward(grad)  # out = norm2(x1 + ff(x1)),  x1 = norm1(src + sa(src))
        g = self.norm1.backward(g + self._feed_forward_backward(self.dropout2.backward(g), pre))
        return g + self._self_attention_backward(g)

    def _self_attention_backward(self, grad: _Array) -> _Array:
        dq, dk, dv = self.self_attn.backward(self.dropout1.backward(grad))
        return dq + dk + dv


class TransformerDecoderLayer(Module, _FeedForward):
    """Self-attention, cross-attention to memory, then feed-forward.
    forward(tgt, memory, tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None,
    tgt_is_causal=False, memory_is_causal=False, kv_cache=None).

    kv_cache (an attnkit extension, for decoding one step at a time): a
    KVCache of this layer's self-attention keys and values. tgt then holds
    only the new positions; they attend causally to everything cached and to
    each other. Inference only (eval mode): backward refuses it.

    Shapes: tgt (T, N, E), (N, T, E) with batch_first, or (T, E); memory
    (S, N, E), (N, S, E) or (S, E); tgt_mask (T, T) or (N*nhead, T, T);
    memory_mask (T, S) or (N*nhead, T, S); tgt_key_padding_mask (N, T),
    memory_key_padding_mask (N, S). Returns tgt's shape."""

    def extra_repr(self) -> str:
        return _layer_extra_repr(self)

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: _ActivationArg = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, *,
                 dtype: npt.DTypeLike = np.float32, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, dtype=dtype, rng=rng)
        self.multihead_attn = MultiHeadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, dtype=dtype, rng=rng)
        self._build_feed_forward(d_model, dim_feedforward, dropout, activation, bias, dtype, rng)
        self.norm_first = F._flag(norm_first, type(self).__name__, "norm_first")
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout, rng=rng)
        self.dropout2 = Dropout(dropout, rng=rng)
        self.dropout3 = Dropout(dropout, rng=rng)

    def _self_attention(self, x: Any, mask: Any, key_padding_mask: Any, is_causal: bool,
                        kv_cache: KVCache | None = None, weights: list[Any] | None = None) -> _Array:
        out, w = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask,
                                need_weights=weights is not None, average_attn_weights=False,
                                is_causal=is_causal, kv_cache=kv_cache)
        if weights is not None:
            weights.append(w)
        return self.dropout1(out)

    def _cross_attention(self, x: Any, memory: Any, mask: Any, key_padding_mask: Any, is_causal: bool,
                         weights: list[Any] | None = None) -> _Array:
        out, w = self.multihead_attn(x, memory, memory, attn_mask=mask,
                                     key_padding_mask=key_padding_mask,
                                     need_weights=weights is not None, average_attn_weights=False,
                                     is_causal=is_causal)
        if weights is not None:
            weights.append(w)
        return self.dropout2(out)

    @overload
    def forward(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: npt.ArrayLike | None = None,
                memory_mask: npt.ArrayLike | None = None,
                tgt_key_padding_mask: npt.ArrayLike | None = None,
                memory_key_padding_mask: npt.ArrayLike | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, kv_cache: KVCache | None = None,
                need_weights: Literal[False] = False) -> _Float: ...
    @overload
    def forward(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: npt.ArrayLike | None = None,
                memory_mask: npt.ArrayLike | None = None,
                tgt_key_padding_mask: npt.ArrayLike | None = None,
                memory_key_padding_mask: npt.ArrayLike | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, kv_cache: KVCache | None = None, *,
                need_weights: Literal[True]) -> tuple[_Float, tuple[_Float, _Float]]: ...
    @overload
    def forward(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: npt.ArrayLike | None = None,
                memory_mask: npt.ArrayLike | None = None,
                tgt_key_padding_mask: npt.ArrayLike | None = None,
                memory_key_padding_mask: npt.ArrayLike | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, kv_cache: KVCache | None = None,
                need_weights: bool = False) -> _Float | tuple[_Float, tuple[_Float, _Float]]: ...
    def forward(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: npt.ArrayLike | None = None,
                memory_mask: npt.ArrayLike | None = None,
                tgt_key_padding_mask: npt.ArrayLike | None = None,
                memory_key_padding_mask: npt.ArrayLike | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, kv_cache: KVCache | None = None,
                need_weights: bool = False) -> _Float | tuple[_Float, tuple[_Float, _Float]]:
        """need_weights (an attnkit extension, for looking inside): also
        return each head's self-attention weights (N, H, L, L) and
        cross-attention weights (N, H, L, S): (output, (self_weights,
        cross_weights))."""
        weights: list[Any] | None = [] if F._flag(need_weights, type(self).__name__, "need_weights") else None
        if self.training:
            if kv_cache is not None:
                raise ValueError(f"{type(self).__name__}: kv_cache is for decoding in eval mode; "
                                 "call .eval() first (training takes whole sequences)")
            out = self._forward_train(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                      memory_key_padding_mask, tgt_is_causal, memory_is_causal, weights)
            return out if weights is None else (out, tuple(weights))
        if kv_cache is not None:
            tgt_is_causal = True           # new positions see the cache and their own past
        x = tgt
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                         kv_cache, weights)
            x = x + self._cross_attention(self.norm2(x), memory, memory_mask,
                                          memory_key_padding_mask, memory_is_causal, weights)
            out = self._feed_forward_residual(self.norm3(x), x, self.dropout3)
        else:
            x = self.norm1(x + self._self_attention(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                                    kv_cache, weights))
            x = self.norm2(x + self._cross_attention(x, memory, memory_mask, memory_key_padding_mask,
                                                     memory_is_causal, weights))
            out = self.norm3(self._feed_forward_residual(x, x, self.dropout3))
        return out if weights is None else (out, tuple(weights))

    def _forward_train(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: Any, memory_mask: Any,
                       tgt_key_padding_mask: Any, memory_key_padding_mask: Any, tgt_is_causal: bool,
                       memory_is_causal: bool, weights: list[Any] | None) -> _Array:
        x = F._as_float_array(tgt, type(self).__name__, "tgt")
        memory = F._as_float_array(memory, type(self).__name__, "memory")
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                         weights=weights)
            x = x + self._cross_attention(self.norm2(x), memory, memory_mask,
                                          memory_key_padding_mask, memory_is_causal, weights)
            ff, pre = self._feed_forward_train(self.norm3(x))
            out = x + self.dropout3(ff)
        else:
            x = self.norm1(x + self._self_attention(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                                    weights=weights))
            x = self.norm2(x + self._cross_attention(x, memory, memory_mask, memory_key_padding_mask,
                                                     memory_is_causal, weights))
            ff, pre = self._feed_forward_train(x)
            out = self.norm3(x + self.dropout3(ff))
        self._save(out.shape, out.dtype, pre)
        return out

    def _backward(self, grad: npt.ArrayLike) -> tuple[_Array, _Array]:
        """(d_tgt, d_memory): memory is cross-attention's key and value, so
        its gradient is the sum of those two."""
        shape, dtype, pre = self._saved
        grad = self._check_grad(grad, shape, dtype)
        if self.norm_first:
            g2 = grad + self.norm3.backward(self._feed_forward_backward(self.dropout3.backward(grad), pre))
            dq, dk, dv = self.multihead_attn.backward(self.dropout2.backward(g2))
            g1 = g2 + self.norm2.backward(dq)
            dq1, dk1, dv1 = self.self_attn.backward(self.dropout1.backward(g1))
            return g1 + self.norm1.backward(dq1 + dk1 + dv1), dk + dv
        g = self.norm3.backward(grad)
        g = self.norm2.backward(g + self._feed_forward_backward(self.dropout3.backward(g), pre))
        dq, dk, dv = self.multihead_attn.backward(self.dropout2.backward(g))
        g = self.norm1.backward(g + dq)
        dq1, dk1, dv1 = self.self_attn.backward(self.dropout1.backward(g))
        return g + dq1 + dk1 + dv1, dk + dv


def _clones(layer: Module, num_layers: int) -> ModuleList:
    """num_layers deep copies of layer, as PyTorch makes them; each copy's
    dropout draws from its own generator, seeded from the original's."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    clones = ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
    for clone in clones:
        for _, module in clone.named_modules():
            if isinstance(getattr(module, "rng", None), np.random.Generator):
                module.rng = np.random.default_rng(int(module.rng.integers(2**63)))
    return clones


class TransformerEncoder(Module):
    """num_layers copies of encoder_layer (state-dict keys layers.0., layers.1.,
    ...) and an optional final norm. forward(src, mask=None,
    src_key_padding_mask=None, is_causal=False), shapes as
    TransformerEncoderLayer's."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Module | None = None) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = len(self.layers)
        self.norm = norm

    def forward(self, src: npt.ArrayLike, mask: npt.ArrayLike | None = None,
                src_key_padding_mask: npt.ArrayLike | None = None, is_causal: bool = False) -> _Float:
        x: Any = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        x = x if self.norm is None else self.norm(x)
        self._save(True)
        return x

    def _backward(self, grad: Any) -> _Array:
        """d_src: through the final norm, then each layer in reverse."""
        if self.norm is not None:
            grad = self.norm.backward(grad)
        for layer in reversed(list(self.layers)):
            grad = layer.backward(grad)
        return grad


class TransformerDecoder(Module):
    """num_layers copies of decoder_layer and an optional final norm.
    forward(tgt, memory, tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None,
    tgt_is_causal=False, memory_is_causal=False, kv_caches=None).

    kv_caches (eval mode, for decoding a step at a time): one KVCache per
    layer, e.g. [nn.KVCache() for _ in range(decoder.num_layers)]; tgt then
    holds only the new positions (see TransformerDecoderLayer, and its shapes)."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: Module | None = None) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = len(self.layers)
        self.norm = norm

    def forward(self, tgt: npt.ArrayLike, memory: npt.ArrayLike, tgt_mask: npt.ArrayLike | None = None,
                memory_mask: npt.ArrayLike | None = None,
                tgt_key_padding_mask: npt.ArrayLike | None = None,
                memory_key_padding_mask: npt.ArrayLike | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, kv_caches: Sequence[KVCache] | None = None) -> _Float:
        if kv_caches is not None and len(kv_caches) != self.num_layers:
            raise ValueError(f"TransformerDecoder: kv_caches needs one KVCache per layer "
                             f"({self.num_layers}), got {len(kv_caches)}")
        x: Any = tgt
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal,
                      kv_cache=None if kv_caches is None else kv_caches[i])
        x = x if self.norm is None else self.norm(x)
        self._save(True)
        return x

    def _backward(self, grad: Any) -> tuple[_Array, _Array]:
        """(d_tgt, d_memory): every layer reads memory, so its gradient is the
        sum of theirs."""
        if self.norm is not None:
            grad = self.norm.backward(grad)
        d_memory: Any = None
        for layer in reversed(list(self.layers)):
            grad, d = layer.backward(grad)
            d_memory = d if d_memory is None else d_memory + d
        return grad, d_memory
