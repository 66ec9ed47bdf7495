"""Multi-head attention (PyTorch's nn.MultiheadAttention, on attnkit's fused
kernel), a cache of keys and values for decoding, and single-head attention
with the classic score functions for comparison.

MultiHeadAttention in one picture (E = embed_dim, H heads of d = E / H):

    q = query @ Wq.T + bq      (N, L, E)  -> H heads of (L, d)
    k = key   @ Wk.T + bk      (N, S, E)  -> H heads of (S, d)
    v = value @ Wv.T + bv      (N, S, E)  -> H heads of (S, d)
    head_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h        (N, L, d) each
    out = concat(head_1 .. head_H) @ Wo.T + bo               (N, L, E)

The heads are joined by concatenation along the features and mixed by one
linear map, out_proj: no activation and no softmax there. The parameters are
4 E^2 + 4 E whatever H is: splitting E into more, narrower heads changes what
the heads can attend to, not how many numbers the layer holds.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from .. import functional as F
from . import init
from .layers import Linear, _float_dtype, _positive
from .module import Module

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]

__all__ = ["MultiHeadAttention", "KVCache", "Attention", "attention_scores"]


def _affine(x: _Array, weight: _Array, bias: _Array | None) -> _Array:
    """x @ weight.T + bias for (N, length, in) inputs the layer has already
    checked: one GEMM over all rows (F.linear's work, without its checks).
    A (length, N, in) array seen batch first is multiplied in its own layout,
    since rows are independent: no copy to reorder them."""
    if not x.flags.c_contiguous and x.ndim == 3 and x.swapaxes(0, 1).flags.c_contiguous:
        return _affine(x.swapaxes(0, 1), weight, bias).swapaxes(0, 1)
    rows = F._readable_as(x, (math.prod(x.shape[:-1]), x.shape[-1]), 1)
    return F._linear_rows(rows, weight, bias).reshape(x.shape[:-1] + (weight.shape[0],))


def _mask_array(mask: npt.ArrayLike, name: str) -> _Array:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(f"MultiHeadAttention: {name} must be bool or float, got dtype {mask.dtype}")
    return mask


class KVCache:
    """Keys and values of the steps decoded so far, for one attention layer:
    (N, Hkv, S, d) each, grown as steps are appended (in place, with room
    reserved ahead, so a step costs its own size, not the cache's).

    Pass it to MultiHeadAttention(..., kv_cache=cache) with the new tokens
    only: their keys and values join the cache and their queries attend to all
    of it, causally aligned to the end (the new tokens are the last ones).
    """

    _keys: Any              # (N, Hkv, capacity, d) arrays once a step is appended, else None
    _values: Any

    def __init__(self) -> None:
        self._keys = self._values = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every cached step."""
        self._keys = self._values = None
        self.length = 0

    def __getstate__(self) -> dict[str, Any]:
        # only the steps cached: the room reserved ahead is uninitialised
        # memory (np.empty), which a pickle would carry and could leak
        if self._keys is None:
            return {"keys": None, "values": None}
        return {"keys": np.ascontiguousarray(self._keys[:, :, :self.length]),
                "values": np.ascontiguousarray(self._values[:, :, :self.length])}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._keys, self._values = state["keys"], state["values"]
        self.length = 0 if self._keys is None else self._keys.shape[2]

    def append(self, keys: _Array, values: _Array) -> tuple[_Array, _Array]:
        """Add (N, Hkv, s, d) keys and values; return views of everything
        cached, (N, Hkv, S, d) each."""
        s = keys.shape[2]
        if self._keys is None:
            capacity = max(16, 2 * s)
            self._keys = np.empty(keys.shape[:2] + (capacity, keys.shape[3]), keys.dtype)
            self._values = np.empty(values.shape[:2] + (capacity, values.shape[3]), values.dtype)
        elif (keys.shape[:2] + keys.shape[3:] != self._keys.shape[:2] + self._keys.shape[3:]
              or keys.dtype != self._keys.dtype):
            raise ValueError(f"KVCache: new keys of shape {keys.shape} ({keys.dtype}) do not fit "
                             f"the cached ones, {self._keys[:, :, :self.length].shape} ({self._keys.dtype})")
        if self.length + s > self._keys.shape[2]:
            capacity = max(2 * self._keys.shape[2], self.length + s)
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                grown = np.empty(old.shape[:2] + (capacity, old.shape[3]), old.dtype)
                grown[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, grown)
        self._keys[:, :, self.length:self.length + s] = keys
        self._values[:, :, self.length:self.length + s] = values
        self.length += s
        return self._keys[:, :, :self.length], self._values[:, :, :self.length]


def _projection_view(name: str, kind: int, index: int, doc: str) -> Any:
    """A property of MultiHeadAttention: Wq, Wk or Wv (kind 0) or their bias
    (kind 1) as the view _weights() gives, which assignment writes into (of
    the same shape; a bias the layer does not have cannot be set)."""
    def read(self: MultiHeadAttention) -> Any:
        return self._weights()[kind][index]

    def write(self: MultiHeadAttention, value: npt.ArrayLike) -> None:
        view = self._weights()[kind][index]
        if view is None:
            raise AttributeError(f"MultiHeadAttention.{name}: the layer was made with bias=False")
        value = np.asarray(value)
        if value.shape != view.shape:
            raise ValueError(f"MultiHeadAttention.{name}: expected shape {view.shape}, got {value.shape}")
        view[...] = value

    return property(read, write, doc=doc + " A view: assignment writes into the module.")


class MultiHeadAttention(Module):
    """torch.nn.MultiheadAttention, same arguments, parameters and results.

    Parameters (names and shapes as PyTorch's, so its state dicts load):
      in_proj_weight (3E, E) and in_proj_bias (3E), when key and value have
      embed_dim features (kdim = vdim = E) and heads are not grouped;
      otherwise q_proj_weight (E, E), k_proj_weight (Hkv d, kdim),
      v_proj_weight (Hkv d, vdim) and in_proj_bias (E + 2 Hkv d);
      out_proj.weight (E, E), out_proj.bias (E); bias_k, bias_v (1, 1, Hkv d)
      with add_bias_kv. Initialised as PyTorch does: Xavier-uniform
      projections, zero biases, Xavier-normal bias_k/bias_v.

    num_kv_heads (an extension; default num_heads) groups the query heads to
    share key/value heads (grouped-query attention).

    Call: (query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False, kv_cache=None)
    with query (L, N, E), key (S, N, kdim), value (S, N, vdim), or (N, L, E)
    etc. with batch_first=True, or unbatched (L, E). Returns (output,
    weights): output like query, weights (N, L, S) averaged over heads, or
    (N, H, L, S), or None when need_weights=False.

    MASKS, READ CAREFULLY: here, as in PyTorch's MultiheadAttention, a bool
    key_padding_mask (N, S) is True where a key is IGNORED (padding), and a
    bool attn_mask (L, S) or (N*H, L, S) is True where attention is NOT
    allowed. attnkit.scaled_dot_product_attention's bool mask means the
    opposite (True = attend), as PyTorch's function does. Float masks are
    added to the scores in both. is_causal=True hides later keys (it needs no
    attn_mask here, unlike PyTorch's, which takes it as a hint about the
    mask). A query left with nothing to attend to gets output 0, not NaN.

    Training: after a training-mode forward, backward(grad_output) takes the
    gradient of the output (the attention weights returned take none) and
    returns (d_query, d_key, d_value), each in the layout of its argument;
    for self-attention, mha(x, x, x), x's gradient is their sum. Dropout in
    backward drops the weights the forward dropped. A forward with a
    kv_cache is for decoding: backward refuses it. In eval mode forward
    keeps nothing and runs the fused inference path.
    """

    # parameters, typed as arrays although those the layer is made without
    # are None (see above): in_proj_weight, or q/k/v_proj_weight; the biases
    in_proj_weight: _Array
    q_proj_weight: _Array
    k_proj_weight: _Array
    v_proj_weight: _Array
    in_proj_bias: _Array
    bias_k: _Array
    bias_v: _Array

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, num_kv_heads: int | None = None,
                 *, dtype: npt.DTypeLike = np.float32, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.embed_dim = _positive(embed_dim, "embed_dim", "MultiHeadAttention")
        self.num_heads = _positive(num_heads, "num_heads", "MultiHeadAttention")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        self.head_dim = self.embed_dim // self.num_heads
        self.num_kv_heads = self.num_heads if num_kv_heads is None else _positive(
            num_kv_heads, "num_kv_heads", "MultiHeadAttention")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        self.kdim = self.embed_dim if kdim is None else _positive(kdim, "kdim", "MultiHeadAttention")
        self.vdim = self.embed_dim if vdim is None else _positive(vdim, "vdim", "MultiHeadAttention")
        self.dropout = F._real(dropout, "MultiHeadAttention", "dropout")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1], got {dropout}")
        self.batch_first = F._flag(batch_first, "MultiHeadAttention", "batch_first")
        self.add_zero_attn = F._flag(add_zero_attn, "MultiHeadAttention", "add_zero_attn")
        self.rng = rng if rng is not None else np.random.default_rng()
        dtype = _float_dtype(dtype)
        E, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E and kv == E
        if self._qkv_same_embed_dim:
            self.register_parameter("in_proj_weight", init.xavier_uniform_(np.empty((3 * E, E), dtype), rng=rng))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.register_parameter("q_proj_weight", init.xavier_uniform_(np.empty((E, E), dtype), rng=rng))
            self.register_parameter("k_proj_weight", init.xavier_uniform_(np.empty((kv, self.kdim), dtype), rng=rng))
            self.register_parameter("v_proj_weight", init.xavier_uniform_(np.empty((kv, self.vdim), dtype), rng=rng))
        self.register_parameter("in_proj_bias", np.zeros(E + 2 * kv, dtype) if bias else None)
        if add_bias_kv:
            self.register_parameter("bias_k", init.xavier_normal_(np.empty((1, 1, kv), dtype), rng=rng))
            self.register_parameter("bias_v", init.xavier_normal_(np.empty((1, 1, kv), dtype), rng=rng))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.out_proj = Linear(E, E, bias=bias, dtype=dtype, rng=rng)
        if bias:
            self.out_proj.bias[...] = 0

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, batch_first={self.batch_first}")

    # -- the projections ---------------------------------------------------------
    # Wq, Wk, Wv and their biases by name, whichever way they are stored: views
    # of the packed in_proj_weight / in_proj_bias (or the separate weights), so
    # reading shows the module's numbers and assigning writes into them.
    q_weight = _projection_view("q_weight", 0, 0, "Wq (E, E): queries = query @ Wq.T + bq.")
    k_weight = _projection_view("k_weight", 0, 1, "Wk (Hkv d, kdim): keys = key @ Wk.T + bk.")
    v_weight = _projection_view("v_weight", 0, 2, "Wv (Hkv d, vdim): values = value @ Wv.T + bv.")
    q_bias = _projection_view("q_bias", 1, 0, "bq (E,), a view of in_proj_bias; None with bias=False.")
    k_bias = _projection_view("k_bias", 1, 1, "bk (Hkv d,), a view of in_proj_bias; None with bias=False.")
    v_bias = _projection_view("v_bias", 1, 2, "bv (Hkv d,), a view of in_proj_bias; None with bias=False.")

    def _weights(self) -> tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]:
        """(Wq, Wk, Wv) and (bq, bk, bv), views into the packed parameters."""
        E, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            W = self.in_proj_weight
            weights = (W[:E], W[E:2 * E], W[2 * E:])
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = self.in_proj_bias
        biases = (None, None, None) if b is None else (b[:E], b[E:E + kv], b[E + kv:])
        return weights, biases

    def _project(self, q: _Array, k: _Array, v: _Array) -> tuple[_Array, _Array, _Array]:
        """(N, L, E), (N, S, kv), (N, S, kv): one product for self-attention."""
        (Wq, Wk, Wv), (bq, bk, bv) = self._weights()
        if q is k and k is v and self._qkv_same_embed_dim:
            qkv = _affine(q, self.in_proj_weight, self.in_proj_bias)
            E = self.embed_dim
            return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        return _affine(q, Wq, bq), _affine(k, Wk, bk), _affine(v, Wv, bv)

    # -- the call ------------------------------------------------------------------
    def _input(self, x: npt.ArrayLike, name: str, features: int) -> _Array:
        x = F._as_float_array(x, "MultiHeadAttention", name)
        if x.dtype != self.dtype:
            raise TypeError(f"MultiHeadAttention: {name} has dtype {x.dtype} but the parameters "
                            f"are {self.dtype}")
        if x.ndim not in (2, 3) or x.shape[-1] != features:
            layout = "(N, L, features)" if self.batch_first else "(L, N, features)"
            raise ValueError(f"MultiHeadAttention: {name} must be {layout} or unbatched "
                             f"(L, features) with {features} features, got shape {x.shape}")
        return x

    @overload
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, need_weights: Literal[True] = True,
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                return_heads: Literal[False] = False) -> tuple[_Float, _Float]: ...
    @overload
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, *, need_weights: Literal[False],
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                return_heads: Literal[False] = False) -> tuple[_Float, None]: ...
    @overload
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, need_weights: Literal[True] = True,
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None, *,
                return_heads: Literal[True]) -> tuple[_Float, _Float, _Float]: ...
    @overload
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, *, need_weights: Literal[False],
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                return_heads: Literal[True]) -> tuple[_Float, None, _Float]: ...
    @overload
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, need_weights: bool = True,
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                return_heads: bool = False) -> tuple[_Float, _Float | None] | tuple[_Float, _Float | None, _Float]: ...
    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                key_padding_mask: npt.ArrayLike | None = None, need_weights: bool = True,
                attn_mask: npt.ArrayLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                return_heads: bool = False) -> tuple[_Float, _Float | None] | tuple[_Float, _Float | None, _Float]:
        """query (L, N, E), key (S, N, kdim), value (S, N, vdim); (N, L, E) etc.
        with batch_first; or unbatched (L, E), (S, kdim), (S, vdim).
        key_padding_mask (N, S) or (S,) unbatched, True = ignore; attn_mask
        (L, S) or (N*H, L, S), True = not allowed, or a float added to the
        scores. Returns (output, weights): output like query, weights (N, L, S)
        averaged over heads, (N, H, L, S) with average_attn_weights=False, or
        None with need_weights=False ((L, S), (H, L, S) unbatched).

        return_heads (an attnkit extension, for looking inside): also
        return each head's output before the heads are joined, (N, H, L,
        head_dim) batch first whatever the layout ((H, L, head_dim)
        unbatched): (output, weights, heads). out_proj of the heads laid side
        by side along the features is the output."""
        return_heads = F._flag(return_heads, "MultiHeadAttention", "return_heads")
        need_weights = F._flag(need_weights, "MultiHeadAttention", "need_weights")
        average_attn_weights = F._flag(average_attn_weights, "MultiHeadAttention", "average_attn_weights")
        is_causal = F._flag(is_causal, "MultiHeadAttention", "is_causal")
        q = self._input(query, "query", self.embed_dim)
        k = q if key is query else self._input(key, "key", self.kdim)
        v = k if value is key else self._input(value, "value", self.vdim)
        if not q.ndim == k.ndim == v.ndim:
            raise ValueError(f"MultiHeadAttention: query, key and value must all be batched or "
                             f"all unbatched, got shapes {q.shape}, {k.shape}, {v.shape}")
        batched = q.ndim == 3
        checked = (q, k, v)      # as the caller laid them out, for the training backward

        def batch_first(x: _Array) -> _Array:  # everything below works on (N, length, features) views
            return x[None] if not batched else x if self.batch_first else x.swapaxes(0, 1)

        q, k, v = batch_first(q), (batch_first(k) if k is not q else None), v  # type: ignore[assignment]
        k = q if k is None else k     # (None above: k was q, and stays q)
        v = k if value is key else batch_first(v)   # keep "is" so self-attention packs one product
        N, L, _ = q.shape
        S = k.shape[1]
        if k.shape[0] != N or v.shape[0] != N or v.shape[1] != S:
            raise ValueError(f"MultiHeadAttention: query, key and value disagree on the batch "
                             f"size, or key and value on the length: query {np.shape(query)}, "
                             f"key {np.shape(key)}, value {np.shape(value)}")

        qp, kp, vp = self._project(q, k, v)                              # (N, L, E), (N, S, kv) x2
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        attn_mask = None if attn_mask is None else _mask_array(attn_mask, "attn_mask")
        key_padding_mask = (None if key_padding_mask is None
                            else _mask_array(key_padding_mask, "key_padding_mask"))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask[None]
        extra = 0  # columns appended to the keys: bias_k, then a zero key
        if self.bias_k is not None:
            kp = np.concatenate([kp, np.broadcast_to(self.bias_k, (N, 1, Hkv * d))], axis=1)
            vp = np.concatenate([vp, np.broadcast_to(self.bias_v, (N, 1, Hkv * d))], axis=1)
            extra += 1
        # every length spelled out: with N, L or S zero, a -1 would be ambiguous
        S_keys = kp.shape[1]
        qh = qp.reshape(N, L, H, d).transpose(0, 2, 1, 3)                  # (N, H, L, d), a view
        kh = kp.reshape(N, S_keys, Hkv, d).transpose(0, 2, 1, 3)          # (N, Hkv, S', d)
        vh = vp.reshape(N, S_keys, Hkv, d).transpose(0, 2, 1, 3)          # (N, Hkv, S', d)
        if self.add_zero_attn:
            zeros = np.zeros((N, Hkv, 1, d), kh.dtype)
            kh = np.concatenate([kh, zeros], axis=2)
            vh = np.concatenate([vh, zeros], axis=2)
            extra += 1
        if kv_cache is not None:
            if extra:
                raise ValueError("MultiHeadAttention: kv_cache does not combine with add_bias_kv "
                                 "or add_zero_attn")
            kh, vh = kv_cache.append(kh, vh)
        S_total = kh.shape[2]
        mask = self._merged_mask(attn_mask, key_padding_mask, N, L, S_total, extra)
        if self.training and kv_cache is None:
            layout = "unbatched" if not batched else "batch_first" if self.batch_first else "seq_first"
            out, weights, heads = self._training_forward(checked, qh, kh, vh, mask, S, is_causal,
                                                         need_weights, average_attn_weights, layout)
            return (out, weights, heads if batched else heads[0]) if return_heads else (out, weights)

        results: Any = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, enable_gqa=Hkv != H,
            causal_alignment="bottom_right" if kv_cache is not None else "top_left",
            return_weights=("mean" if average_attn_weights else True) if need_weights else False,
            rng=self.rng)
        heads, weights = results if need_weights else (results, None)   # (N, H, L, d)
        merged = heads.transpose(0, 2, 1, 3).reshape(N, L, self.embed_dim)
        out = _affine(merged, self.out_proj.weight, self.out_proj.bias)  # (N, L, E)
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = np.ascontiguousarray(out.swapaxes(0, 1))
        if weights is not None and not batched:                           # (N, L, S') averaged,
            weights = weights[0]                                          # or (N, H, L, S')
        if self.training:      # with a kv_cache: a forward for decoding, which backward refuses
            self._save("kv_cache")
        if return_heads:
            return out, weights, heads if batched else heads[0]
        return out, weights

    # -- training ------------------------------------------------------------------
    # The training forward works like the inference one above, but calls out_proj as a
    # child module (so that its backward runs), keeps what backward needs, and lays the
    # merged heads out in the caller's layout (a (L, N, E) input gives a (L, N, E)
    # product, no transposed copy before or after out_proj).

    @staticmethod
    def _heads_view(a: _Array, layout: str) -> _Array:
        """(N, Hx, T, d) heads as a view in the caller's layout: (T, Hx, d)
        unbatched, (N, T, Hx, d) batch first, (T, N, Hx, d) otherwise."""
        if layout == "unbatched":
            return a[0].transpose(1, 0, 2)
        return a.transpose(0, 2, 1, 3) if layout == "batch_first" else a.transpose(2, 0, 1, 3)

    @classmethod
    def _merge_heads(cls, a: _Array, layout: str) -> _Array:
        """(N, Hx, T, d) heads side by side in the caller's layout, (..., Hx d): a new array."""
        view = cls._heads_view(a, layout)
        return view.reshape(view.shape[:-2] + (view.shape[-2] * view.shape[-1],))

    @staticmethod
    def _split_heads(g: _Array, heads: int, layout: str) -> _Array:
        """_merge_heads undone: (..., Hx d) in the caller's layout -> (N, Hx, T, d), a view."""
        d = g.shape[-1] // heads
        if layout == "unbatched":
            return g.reshape(g.shape[0], heads, d).transpose(1, 0, 2)[None]
        if layout == "batch_first":
            return g.reshape(g.shape[0], g.shape[1], heads, d).transpose(0, 2, 1, 3)
        return g.reshape(g.shape[0], g.shape[1], heads, d).transpose(1, 2, 0, 3)

    def _training_forward(self, checked, qh, kh, vh, mask, S, is_causal, need_weights,
                          average_attn_weights, layout):
        H, Hkv = self.num_heads, self.num_kv_heads
        dropout_p = self.dropout
        # the same draw as the inference path's rng=self.rng makes, so that a
        # seeded module drops the same weights as before; kept for backward
        seed = int(self.rng.integers(0, 2**32, dtype=np.uint64)) if dropout_p > 0 else None
        results: Any = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
            enable_gqa=Hkv != H,
            return_weights=("mean" if average_attn_weights else True) if need_weights else False,
            return_lse=True, dropout_seed=seed)
        heads, weights, lse = results if need_weights else (results[0], None, results[1])
        out = self.out_proj(self._merge_heads(heads, layout))            # the query's layout
        if weights is not None and layout == "unbatched":
            weights = weights[0]
        q_in, k_in, v_in = checked
        packed = q_in is k_in and k_in is v_in and self._qkv_same_embed_dim
        self._save(layout, packed, q_in, k_in, v_in, qh, kh, vh, heads, lse, mask, S, is_causal,
                   dropout_p, seed)
        return out, weights, heads

    def _backward(self, grad_output: npt.ArrayLike) -> tuple[_Array, ...]:
        """(d_query, d_key, d_value) for the gradient of the output (the
        weights the forward returned take no gradient: only the output's is
        given), each in the layout the forward was called with. For
        self-attention (one array passed as query, key and value) these are
        the three arguments' gradients: the array's is their sum. The
        parameters' gradients (projections, biases, bias_k/bias_v, out_proj)
        are added into grads(). Not after a forward with a kv_cache, which is
        for decoding."""
        if self._saved[0] == "kv_cache":
            raise RuntimeError("MultiHeadAttention.backward: the last forward used a kv_cache, "
                               "which is for inference (the cached keys and values of earlier "
                               "calls would get no gradient); train on whole sequences "
                               "(is_causal=True) and decode with the cache in eval mode")
        (layout, packed, q_in, k_in, v_in, qh, kh, vh, heads, lse, mask, S, is_causal, dropout_p,
         seed) = self._saved
        grad = self._check_grad(grad_output, q_in.shape, q_in.dtype)
        H, Hkv, E = self.num_heads, self.num_kv_heads, self.embed_dim
        kv = Hkv * self.head_dim
        d_merged = self.out_proj.backward(grad)                           # the query's layout
        dqh, dkh, dvh = F.scaled_dot_product_attention_backward(
            self._split_heads(d_merged, H, layout), qh, kh, vh, heads, lse, mask, dropout_p,
            is_causal, enable_gqa=Hkv != H, dropout_seed=seed)          # (N, H|Hkv, S', d)
        if self.bias_k is not None:                                       # key/value row S
            for name, dh in (("bias_k", dkh), ("bias_v", dvh)):
                if self._wants_grad(name):
                    self._accumulate(name, dh[:, :, S].sum(axis=0).reshape(1, 1, kv))
        dkh, dvh = dkh[:, :, :S], dvh[:, :, :S]                          # drop bias and zero rows

        w_grad, b_grad = self._grad_buffer("in_proj_weight"), self._grad_buffer("in_proj_bias")
        bounds = ((0, E), (E, E + kv), (E + kv, E + 2 * kv))
        b_grads: list[Any] = [False if b_grad is False else b_grad[a:b] for a, b in bounds]
        (Wq, Wk, Wv), _ = self._weights()
        if packed:
            # one (..., 3E) gradient of the packed projection: one dW product
            # over it; each argument's gradient is its own third times W's
            view = self._heads_view(dqh, layout)
            dqkv = np.empty(view.shape[:-2] + (3, H, self.head_dim), q_in.dtype)
            for i, dh in enumerate((dqh, dkh, dvh)):
                dqkv[..., i, :, :] = self._heads_view(dh, layout)
            dqkv = dqkv.reshape(view.shape[:-2] + (3 * E,))
            if w_grad is not False or b_grad is not False:
                F.linear_backward(dqkv, q_in, self.in_proj_weight, input_grad=False,
                                  weight_grad=w_grad, bias_grad=b_grad)
            rows = dqkv.reshape(-1, 3 * E)
            return tuple(F._linear_rows(rows[:, a:b], W.T, None).reshape(q_in.shape)
                         for (a, b), W in zip(bounds, (Wq, Wk, Wv)))
        if self._qkv_same_embed_dim:
            w_grads: list[Any] = [False if w_grad is False else w_grad[a:b] for a, b in bounds]
        else:
            w_grads = [self._grad_buffer(name) for name in ("q_proj_weight", "k_proj_weight",
                                                             "v_proj_weight")]
        return tuple(F.linear_backward(self._merge_heads(dh, layout), x, W, weight_grad=wg,
                                       bias_grad=bg)[0]
                     for dh, x, W, wg, bg in zip((dqh, dkh, dvh), (q_in, k_in, v_in), (Wq, Wk, Wv),
                                                 w_grads, b_grads))

    def _merged_mask(self, attn_mask: _Array | None, key_padding_mask: _Array | None, N: int, L: int,
                     S: int, extra: int) -> _Array | None:
        """attn_mask and key_padding_mask (PyTorch's MHA meaning: True = hide)
        as one mask for scaled_dot_product_attention (True = attend, or a float
        to add), broadcastable to (N, H, L, S); the `extra` appended keys get
        no mask of their own (they are visible), as in PyTorch."""
        H = self.num_heads
        masks = []
        if attn_mask is not None:
            m = attn_mask
            if m.shape == (N * H, L, S - extra):
                m = m.reshape(N, H, L, S - extra)
            elif m.shape != (L, S - extra):
                raise ValueError(f"MultiHeadAttention: attn_mask must be ({L}, {S - extra}) or "
                                 f"({N * H}, {L}, {S - extra}), got {attn_mask.shape}")
            masks.append(m)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S - extra):
                raise ValueError(f"MultiHeadAttention: key_padding_mask must be ({N}, {S - extra}), "
                                 f"got {key_padding_mask.shape}")
            masks.append(key_padding_mask.reshape(N, 1, 1, S - extra))
        if not masks:
            return None
        if all(m.dtype == np.bool_ for m in masks):
            allowed = ~masks[0]
            for m in masks[1:]:
                allowed = allowed & ~m
            if extra:
                pad = [(0, 0)] * (allowed.ndim - 1) + [(0, extra)]
                allowed = np.pad(allowed, pad, constant_values=True)
            return allowed
        added: Any = None
        for m in masks:
            as_float = (np.where(m, -np.inf, 0.0) if m.dtype == np.bool_ else m).astype(self.dtype)
            added = as_float if added is None else added + as_float
        if extra:
            added = np.pad(added, [(0, 0)] * (added.ndim - 1) + [(0, extra)])
        return added


# ---------------------------------------------------------------------------
# Single-head attention with the classic score functions

SCORES = ("scaled_dot", "dot", "general", "additive")
NORMALIZERS = ("softmax", "sigmoid", "relu")


def attention_scores(query: npt.ArrayLike, key: npt.ArrayLike,
                     score: Literal["scaled_dot", "dot", "general", "additive"] = "scaled_dot",
                     weight: _Array | None = None, w_query: _Array | None = None,
                     w_key: _Array | None = None, v: _Array | None = None) -> _Float:
    """Scores (..., L, S) of queries (..., L, dq) against keys (..., S, dk):

      scaled_dot  q . k / sqrt(d)                   (Vaswani et al.; dq = dk = d)
      dot         q . k                             (Luong's dot)
      general     q^T W k, W (dq, dk)               (Luong's general, bilinear)
      additive    v^T tanh(Wq q + Wk k), Wq (h, dq), Wk (h, dk), v (h)   (Bahdanau)
    """
    q = F._as_float_array(query, "attention_scores", "query")
    k = F._as_float_array(key, "attention_scores", "key")
    if score in ("scaled_dot", "dot"):
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"attention_scores: {score} needs queries and keys of one size, got "
                             f"{q.shape} and {k.shape}")
        s = q @ np.swapaxes(k, -1, -2)                                   # (..., L, S)
        return s / q.dtype.type(math.sqrt(q.shape[-1])) if score == "scaled_dot" else s
    if score == "general":
        return (q @ weight) @ np.swapaxes(k, -1, -2)                     # (..., L, S)
    if score == "additive":
        # w_query, w_key and v are given with score="additive"
        hq = q @ w_query.T  # type: ignore[union-attr]                   # (..., L, h)
        hk = k @ w_key.T  # type: ignore[union-attr]                     # (..., S, h)
        return np.tanh(hq[..., :, None, :] + hk[..., None, :, :]) @ v    # (..., L, S)
    raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")


class Attention(Module):
    """Single-head attention, for comparing score functions and normalisers.

    score: "scaled_dot", "dot", "general" (parameter weight (dq, dk)) or
    "additive" (w_query (hidden, dq), w_key (hidden, dk), v (hidden)); see
    attention_scores. normalizer: "softmax" (weights sum to 1 over the keys),
    "sigmoid" or "relu" (applied to each score alone: weights need not sum to
    1, which is the point of comparing them). A bool mask (..., L, S) is True
    where a key may be attended to.

    Call (query (..., L, dq), key (..., S, dk), value (..., S, dv),
    mask=None) -> (output (..., L, dv), weights (..., L, S)).

    Training: backward(grad_output) takes the gradient of the output (the
    weights returned take none) and returns (d_query, d_key, d_value).
    """

    weight: _Array
    w_query: _Array
    w_key: _Array
    v: _Array

    def __init__(self, query_dim: int, key_dim: int | None = None,
                 score: Literal["scaled_dot", "dot", "general", "additive"] = "scaled_dot",
                 normalizer: Literal["softmax", "sigmoid", "relu"] = "softmax",
                 hidden_dim: int | None = None, *, dtype: npt.DTypeLike = np.float32,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"Attention: unknown score {score!r}; expected one of {', '.join(SCORES)}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"Attention: unknown normalizer {normalizer!r}; expected one of "
                             f"{', '.join(NORMALIZERS)}")
        self.query_dim = _positive(query_dim, "query_dim", "Attention")
        self.key_dim = self.query_dim if key_dim is None else _positive(key_dim, "key_dim", "Attention")
        if score in ("scaled_dot", "dot") and self.key_dim != self.query_dim:
            raise ValueError(f"Attention: the {score} score needs query_dim == key_dim, got "
                             f"{self.query_dim} and {self.key_dim}")
        self.score, self.normalizer = score, normalizer
        dtype = _float_dtype(dtype)
        if score == "general":
            self.register_parameter("weight", init.xavier_uniform_(
                np.empty((self.query_dim, self.key_dim), dtype), rng=rng))
        if score == "additive":
            hidden = self.query_dim if hidden_dim is None else _positive(hidden_dim, "hidden_dim", "Attention")
            self.register_parameter("w_query", init.xavier_uniform_(np.empty((hidden, self.query_dim), dtype), rng=rng))
            self.register_parameter("w_key", init.xavier_uniform_(np.empty((hidden, self.key_dim), dtype), rng=rng))
            self.register_parameter("v", init.uniform_(np.empty(hidden, dtype), -1 / math.sqrt(hidden),
                                                       1 / math.sqrt(hidden), rng=rng))

    def forward(self, query: npt.ArrayLike, key: npt.ArrayLike, value: npt.ArrayLike,
                mask: npt.ArrayLike | None = None) -> tuple[_Float, _Float]:
        """query (..., L, dq), key (..., S, dk), value (..., S, dv), mask (..., L, S)
        bool or None -> (output (..., L, dv), weights (..., L, S))."""
        params = {name: value for name, value in self._parameters.items()}
        s = attention_scores(query, key, self.score, **params)          # (..., L, S)
        if self.normalizer == "softmax":
            w = F.softmax(s, axis=-1, where=mask)
        else:
            w = F.sigmoid(s) if self.normalizer == "sigmoid" else F.relu(s)
            if mask is not None:
                w = np.where(mask, w, 0).astype(w.dtype)
        value = F._as_float_array(value, "Attention", "value")
        out = w @ value                                                  # (..., L, dv)
        if self.training:
            self._save(np.asarray(query), np.asarray(key), value, s, w, mask, out.shape, out.dtype)
        return out, w                                                    # (..., L, dv), (..., L, S)

    def _backward(self, grad_output: npt.ArrayLike) -> tuple[_Array, _Array, _Array]:
        """(d_query, d_key, d_value) for the gradient of the output (the
        returned weights take no gradient: only the output's is given); the
        score's parameters' gradients are added into grads(). Masked-out
        scores pass no gradient."""
        q, k, value, s, w, mask, shape, dtype = self._saved
        g = self._check_grad(grad_output, shape, dtype)
        d_value = F._sum_to_shape(np.swapaxes(w, -1, -2) @ g, value.shape)     # (..., S, dv)
        dw = F._sum_to_shape(g @ np.swapaxes(value, -1, -2), w.shape).astype(w.dtype, copy=False)
        if self.normalizer == "softmax":
            ds = F.softmax_backward(dw, w, axis=-1, where=mask)
        else:
            ds = dw * (w * (1 - w) if self.normalizer == "sigmoid" else (s > 0))
            if mask is not None:
                ds = np.where(mask, ds, 0)
        ds = F._sum_to_shape(ds, s.shape).astype(s.dtype, copy=False)             # (..., L, S)
        if self.score == "scaled_dot":
            ds = ds / ds.dtype.type(math.sqrt(q.shape[-1]))
        if self.score in ("scaled_dot", "dot"):
            dq, dk = ds @ k, np.swapaxes(ds, -1, -2) @ q
        elif self.score == "general":
            W = self.weight
            dqW = ds @ k                                                 # d(q @ W), (..., L, dk)
            dq, dk = dqW @ W.T, np.swapaxes(ds, -1, -2) @ (q @ W)
            if self._wants_grad("weight"):
                self._accumulate("weight", _rows(q, dqW).T @ _rows(dqW))
        else:   # additive: s = tanh(hq_l + hk_s) . v
            Wq, Wk, v = self.w_query, self.w_key, self.v
            t = np.tanh((q @ Wq.T)[..., :, None, :] + (k @ Wk.T)[..., None, :, :])   # (..., L, S, h)
            if self._wants_grad("v"):
                self._accumulate("v", ds.reshape(-1) @ t.reshape(-1, t.shape[-1]))
            dpre = ds[..., None] * v * (1 - t * t)                       # (..., L, S, h)
            dhq, dhk = dpre.sum(axis=-2), dpre.sum(axis=-3)              # (..., L, h), (..., S, h)
            dq, dk = dhq @ Wq, dhk @ Wk
            if self._wants_grad("w_query"):
                self._accumulate("w_query", _rows(dhq).T @ _rows(q, dhq))
            if self._wants_grad("w_key"):
                self._accumulate("w_key", _rows(dhk).T @ _rows(k, dhk))
        return (F._sum_to_shape(dq, q.shape).astype(q.dtype, copy=False),
                F._sum_to_shape(dk, k.shape).astype(k.dtype, copy=False),
                d_value.astype(value.dtype, copy=False))


def _rows(x: _Array, like: _Array | None = None) -> _Array:
    """x (..., n) broadcast to like's leading dimensions, as (rows, n)."""
    if like is not None:
        x = np.broadcast_to(x, like.shape[:-1] + x.shape[-1:])
    return x.reshape(-1, x.shape[-1])
