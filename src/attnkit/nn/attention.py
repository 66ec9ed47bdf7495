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
import math

import numpy as np

from .. import functional as F
from . import init
from .layers import Linear, _float_dtype, _positive
from .module import Module

__all__ = ["MultiHeadAttention", "KVCache", "Attention", "attention_scores"]


def _affine(x, weight, bias):
    """x @ weight.T + bias for (N, length, in) inputs the layer has already
    checked: one GEMM over all rows (F.linear's work, without its checks).
    A (length, N, in) array seen batch first is multiplied in its own layout,
    since rows are independent: no copy to reorder them."""
    if not x.flags.c_contiguous and x.ndim == 3 and x.swapaxes(0, 1).flags.c_contiguous:
        return _affine(x.swapaxes(0, 1), weight, bias).swapaxes(0, 1)
    rows = F._readable_as(x, (math.prod(x.shape[:-1]), x.shape[-1]), 1)
    return F._linear_rows(rows, weight, bias).reshape(x.shape[:-1] + (weight.shape[0],))


def _mask_array(mask, name):
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

    def __init__(self):
        self._keys = self._values = None
        self.length = 0

    def __len__(self):
        return self.length

    def reset(self):
        self._keys = self._values = None
        self.length = 0

    def __getstate__(self):
        # only the steps cached: the room reserved ahead is uninitialised
        # memory (np.empty), which a pickle would carry and could leak
        if self._keys is None:
            return {"keys": None, "values": None}
        return {"keys": np.ascontiguousarray(self._keys[:, :, :self.length]),
                "values": np.ascontiguousarray(self._values[:, :, :self.length])}

    def __setstate__(self, state):
        self._keys, self._values = state["keys"], state["values"]
        self.length = 0 if self._keys is None else self._keys.shape[2]

    def append(self, keys, values):
        """Add (N, Hkv, s, d) keys and values; return views of everything cached."""
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
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, num_kv_heads=None,
                 *, dtype=np.float32, rng=None):
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

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, batch_first={self.batch_first}")

    # -- the projections ---------------------------------------------------------
    def _weights(self):
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

    def _project(self, q, k, v):
        """(N, L, E), (N, S, kv), (N, S, kv): one product for self-attention."""
        (Wq, Wk, Wv), (bq, bk, bv) = self._weights()
        if q is k and k is v and self._qkv_same_embed_dim:
            qkv = _affine(q, self.in_proj_weight, self.in_proj_bias)    # (N, L, 3E)
            E = self.embed_dim
            return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        return _affine(q, Wq, bq), _affine(k, Wk, bk), _affine(v, Wv, bv)

    # -- the call ------------------------------------------------------------------
    def _input(self, x, name, features):
        x = F._as_float_array(x, "MultiHeadAttention", name)
        if x.dtype != self.dtype:
            raise TypeError(f"MultiHeadAttention: {name} has dtype {x.dtype} but the parameters "
                            f"are {self.dtype}")
        if x.ndim not in (2, 3) or x.shape[-1] != features:
            layout = "(N, L, features)" if self.batch_first else "(L, N, features)"
            raise ValueError(f"MultiHeadAttention: {name} must be {layout} or unbatched "
                             f"(L, features) with {features} features, got shape {x.shape}")
        return x

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, kv_cache=None):
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

        def batch_first(x):  # everything below works on (N, length, features) views
            return x[None] if not batched else x if self.batch_first else x.swapaxes(0, 1)

        q, k, v = batch_first(q), (batch_first(k) if k is not q else None), v
        k = q if k is None else k
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

        results = F.scaled_dot_product_attention(
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
        return out, weights

    def _merged_mask(self, attn_mask, key_padding_mask, N, L, S, extra):
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
        added = None
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


def attention_scores(query, key, score="scaled_dot", weight=None, w_query=None, w_key=None, v=None):
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
        hq = q @ w_query.T                                               # (..., L, h)
        hk = k @ w_key.T                                                 # (..., S, h)
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
    """

    def __init__(self, query_dim, key_dim=None, score="scaled_dot", normalizer="softmax",
                 hidden_dim=None, *, dtype=np.float32, rng=None):
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

    def forward(self, query, key, value, mask=None):
        params = {name: value for name, value in self._parameters.items()}
        s = attention_scores(query, key, self.score, **params)          # (..., L, S)
        if self.normalizer == "softmax":
            w = F.softmax(s, axis=-1, where=mask)
        else:
            w = F.sigmoid(s) if self.normalizer == "sigmoid" else F.relu(s)
            if mask is not None:
                w = np.where(mask, w, 0).astype(w.dtype)
        value = F._as_float_array(value, "Attention", "value")
        return w @ value, w                                              # (..., L, dv), (..., L, S)
