"""BERT's encoder (Devlin et al.) from attnkit's layers, with the module names
of Hugging Face's BertModel, so its checkpoints load as they are.

    embeddings:  word + position + token type, then LayerNorm (and dropout)
    each layer:  a = LayerNorm(x + dense(attention(x)))            post-norm
                 x = LayerNorm(a + dense(gelu(dense(a))))
    attention:   query/key/value projections, heads of hidden/heads features,
                 scores / sqrt(head dim), padded keys masked out

In eval mode (what from_pretrained returns) dropout is off and the fused
paths run. In training mode (model.train()) dropout is on, with the
config's probabilities as Hugging Face's, and each module calls its children
so that model.backward(grad) can call their backwards in reverse, leaving
every parameter's gradient in model.grads(). Layers whose parameters, and all
below them, are frozen (model.freeze(...)) are not differentiated at all.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from .. import functional as F
from ..io import load_state_dict
from ..nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from ..nn.layers import ACTIVATION_BACKWARDS, get_activation

if TYPE_CHECKING:
    import numpy.typing as npt

    _Array = npt.NDArray[Any]
    _Float = npt.NDArray[np.floating]

__all__ = ["BertConfig", "BertModel", "BertOutput"]


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the encoder uses."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
        """The config of a checkpoint's config.json (Hugging Face's keys;
        others are ignored)."""
        with open(path) as f:
            raw = json.load(f)
        known = {field.name for field in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if config.position_embedding_type != "absolute":
            raise ValueError(f"{path}: position_embedding_type {config.position_embedding_type!r} "
                             "is not supported (only 'absolute')")
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {config.hidden_act!r} is not supported; "
                             f"expected one of {sorted(_ACTIVATIONS)}")
        problem = config._heads_problem()
        if problem:
            raise ValueError(f"{path}: {problem}")
        return config

    def _heads_problem(self) -> str | None:
        # checked before the division, which would otherwise fail with a bare ZeroDivisionError
        heads = self.num_attention_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            return f"num_attention_heads must be a positive int, got {heads!r}"
        if self.hidden_size % heads:
            return f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {heads}"
        return None


# Hugging Face's hidden_act names -> F.linear's activation names
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class BertOutput:
    """What BertModel.forward returns when asked for more than the last
    hidden states (Hugging Face's BaseModelOutput, without the pooler).

    last_hidden_state: (N, L, hidden), what forward returns by default.
    hidden_states: with output_hidden_states, a tuple of num_layers + 1
        arrays (N, L, hidden): the embeddings' output, then each layer's
        output (the last is last_hidden_state); else None.
    attentions: with output_attentions, a tuple of num_layers arrays
        (N, heads, L, L): each layer's softmax weights, padded keys masked
        out (weight 0), before dropout; else None.
    """
    last_hidden_state: _Float
    hidden_states: tuple[_Float, ...] | None = None
    attentions: tuple[_Float, ...] | None = None


class _Container(Module):
    """A module that only names its children, as Hugging Face's nesting does."""

    if TYPE_CHECKING:   # its children are set by name
        def __getattr__(self, name: str) -> Any: ...


class BertEmbeddings(Module):
    def __init__(self, c: BertConfig, dtype: npt.DTypeLike, rng: np.random.Generator | None) -> None:
        super().__init__()
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id,
                                         dtype=dtype, rng=rng)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size, dtype=dtype, rng=rng)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size, dtype=dtype, rng=rng)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.dropout = Dropout(c.hidden_dropout_prob, rng=rng)

    def forward(self, input_ids: _Array, token_type_ids: _Array) -> _Array:
        """input_ids, token_type_ids (N, L) ints -> (N, L, hidden)."""
        L = input_ids.shape[1]
        max_length = self.position_embeddings.num_embeddings
        if L > max_length:
            # a shorter slice of the table would fail to broadcast, far from the cause
            raise ValueError(f"BertModel: {L} tokens is more than the {max_length} positions "
                             "the model knows")
        x = self.word_embeddings(input_ids)                                   # (N, L, hidden)
        x += self.token_type_embeddings(token_type_ids)
        if self.training:                          # the child called, for its backward
            x += self.position_embeddings(np.arange(L))
        else:
            x += self.position_embeddings.weight[:L]                          # positions 0..L-1
        out = self.dropout(self.LayerNorm(x))
        self._save(out.shape, out.dtype)
        return out

    def _backward(self, grad: Any) -> None:
        grad = self.LayerNorm.backward(self.dropout.backward(grad))
        self.word_embeddings.backward(grad)
        self.token_type_embeddings.backward(grad)
        self.position_embeddings.backward(grad.sum(axis=0))   # every sequence read positions 0..L-1
        return None


class BertSelfAttention(Module):
    def __init__(self, c: BertConfig, dtype: npt.DTypeLike, rng: np.random.Generator | None) -> None:
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = Linear(c.hidden_size, c.hidden_size, dtype=dtype, rng=rng)
        self.key = Linear(c.hidden_size, c.hidden_size, dtype=dtype, rng=rng)
        self.value = Linear(c.hidden_size, c.hidden_size, dtype=dtype, rng=rng)
        self.dropout_p = c.attention_probs_dropout_prob
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x: _Array, key_mask: _Array, output_attentions: bool = False) -> Any:
        """x (N, L, hidden), key_mask (N, 1, 1, L) bool True = attend ->
        (N, L, hidden); with output_attentions, (that, the softmax weights
        (N, H, L, L) before dropout)."""
        N, L, hidden = x.shape
        H, d = self.num_heads, self.head_dim

        def heads(projection: Linear) -> _Array:     # (N, L, hidden) -> (N, H, L, d), a view
            return projection(x).reshape(N, L, H, d).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        weights = None
        if not self.training:
            if output_attentions:
                context, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                                  return_weights=True)
            else:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (N, H, L, d)
        else:
            # dropout of the weights, replayed by backward from the same seed
            p = self.dropout_p
            seed = F._draw_dropout_seed(self.rng, "BertSelfAttention") if p > 0 else None
            if output_attentions and seed is None:       # no dropout: the weights are the ones used
                context, weights, lse = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=key_mask, return_weights=True, return_lse=True)
            else:
                context, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p,
                                                              dropout_seed=seed, return_lse=True)
                if output_attentions:
                    # the kernel's weights would include the dropout; these are before it
                    _, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                                return_weights=True)
            self._save(q, k, v, key_mask, context, lse, seed)
        out = context.transpose(0, 2, 1, 3).reshape(N, L, hidden)          # heads side by side
        return (out, weights) if output_attentions else out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        """d_x: the attention's gradients to its queries, keys and values go
        back through the three projections, and add."""
        q, k, v, key_mask, context, lse, seed = self._saved
        N, H, L, d = q.shape
        grad = self._check_grad(grad, (N, L, H * d), q.dtype)
        dq, dk, dv = F.scaled_dot_product_attention_backward(
            grad.reshape(N, L, H, d).transpose(0, 2, 1, 3), q, k, v, context, lse,
            attn_mask=key_mask, dropout_p=self.dropout_p if seed is not None else 0.0,
            dropout_seed=seed)

        def merged(g: _Array) -> _Array:             # (N, H, L, d) -> (N, L, hidden)
            return g.transpose(0, 2, 1, 3).reshape(N, L, H * d)

        return (self.query.backward(merged(dq)) + self.key.backward(merged(dk))
                + self.value.backward(merged(dv)))


class BertOutputBlock(Module):
    """dense, then LayerNorm of the residual sum (BertSelfOutput, BertOutput)."""

    def __init__(self, in_features: int, c: BertConfig, dtype: npt.DTypeLike,
                 rng: np.random.Generator | None) -> None:
        super().__init__()
        self.dense = Linear(in_features, c.hidden_size, dtype=dtype, rng=rng)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.dropout = Dropout(c.hidden_dropout_prob, rng=rng)

    def forward(self, x: _Array, residual: _Array) -> _Array:
        """x (N, L, in_features), residual (N, L, hidden) -> (N, L, hidden)."""
        if not self.training:
            return self.LayerNorm(self.dense(x, residual=residual))   # the residual added in the GEMM's pass
        out = self.LayerNorm(self.dropout(self.dense(x)) + residual)
        self._save(True)
        return out

    def _backward(self, grad: Any) -> tuple[_Array, _Array]:
        """(d_x, d_residual)."""
        grad = self.LayerNorm.backward(grad)
        return self.dense.backward(self.dropout.backward(grad)), grad


class BertLayer(Module):
    def __init__(self, c: BertConfig, dtype: npt.DTypeLike, rng: np.random.Generator | None) -> None:
        super().__init__()
        self.attention = _Container()
        setattr(self.attention, "self", BertSelfAttention(c, dtype, rng))  # HF's name: attention.self
        self.attention.output = BertOutputBlock(c.hidden_size, c, dtype, rng)
        self.intermediate = _Container()
        self.intermediate.dense = Linear(c.hidden_size, c.intermediate_size, dtype=dtype, rng=rng)
        self.output = BertOutputBlock(c.intermediate_size, c, dtype, rng)
        self.activation = _ACTIVATIONS[c.hidden_act]

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, x: _Array, key_mask: _Array, output_attentions: bool = False) -> Any:
        """x (N, L, hidden), key_mask (N, 1, 1, L) -> (N, L, hidden); with
        output_attentions, (that, the attention's
        weights (N, H, L, L))."""
        s = getattr(self.attention, "self")(x, key_mask, output_attentions)
        s, weights = s if output_attentions else (s, None)
        a = self.attention.output(s, x)
        dense = self.intermediate.dense
        if not self.training:                              # bias and activation in one pass
            h = F.linear(a, dense.weight, dense.bias,  # (N, L, intermediate)
                         activation=self.activation)  # type: ignore[arg-type]  # one of linear's
            out = self.output(h, a)
        else:
            pre = dense(a)
            out = self.output(get_activation(self.activation)(pre), a)
            self._save(pre)
        return (out, weights) if output_attentions else out

    def _backward(self, grad: npt.ArrayLike) -> _Array:
        (pre,) = self._saved
        dh, da = self.output.backward(grad)
        da = da + self.intermediate.dense.backward(
            ACTIVATION_BACKWARDS[get_activation(self.activation)](dh, pre))
        ds, dx = self.attention.output.backward(da)
        return dx + getattr(self.attention, "self").backward(ds)


class BertModel(Module):
    """BERT's embeddings and encoder; forward gives the last hidden states.

    forward(input_ids (N, L) ints, attention_mask (N, L) 1/0 or bool =
    None, token_type_ids (N, L) = None, *, output_attentions=False,
    output_hidden_states=False) -> (N, L, hidden). The pooler of a
    checkpoint, if present, is not loaded (sentence embeddings do not use it).

    To look inside, as Hugging Face's output_attentions and
    output_hidden_states: with either True, forward returns a BertOutput
    instead, whose last_hidden_state is the array above, hidden_states (if
    asked) a tuple of num_layers + 1 arrays (N, L, hidden), the embeddings'
    output then each layer's, and attentions (if asked) a tuple of
    num_layers arrays (N, heads, L, L), the softmax weights of each layer's
    heads: padded keys get weight 0, each query's row sums to 1 over the
    others (a padded query attends as any other), and the weights are those
    before attention dropout (in training mode too), as Hugging Face's eval
    mode gives. With both False nothing extra is computed or kept.

    In training mode model.backward(grad) takes grad, the gradient of
    last_hidden_state only (N, L, hidden), whatever was returned: the
    attentions and the hidden states are outputs to look at, not to
    differentiate.
    """

    def __init__(self, config: BertConfig, *, dtype: npt.DTypeLike = np.float32,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        problem = config._heads_problem()
        if problem:
            raise ValueError(f"BertModel: {problem}")
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype, rng)
        self.encoder = _Container()
        self.encoder.layer = ModuleList(BertLayer(config, dtype, rng) for _ in range(config.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *,
                        dtype: npt.DTypeLike = np.float32) -> BertModel:
        """Read config.json and model.safetensors from a checkpoint directory."""
        path = os.fspath(path)
        config = BertConfig.from_json(os.path.join(path, "config.json"))
        model = cls(config, dtype=dtype, rng=np.random.default_rng(0))
        state = load_state_dict(os.path.join(path, "model.safetensors"))
        # Hugging Face saves some models with a "bert." prefix, and keeps a
        # position_ids buffer and the pooler, which this encoder does not use
        state = {k[5:] if k.startswith("bert.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        model.load_state_dict(state)
        return model.eval()

    @overload
    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None,
                token_type_ids: npt.ArrayLike | None = None, *,
                output_attentions: Literal[False] = False,
                output_hidden_states: Literal[False] = False) -> _Float: ...
    @overload
    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None,
                token_type_ids: npt.ArrayLike | None = None, *, output_attentions: Literal[True],
                output_hidden_states: bool = False) -> BertOutput: ...
    @overload
    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None,
                token_type_ids: npt.ArrayLike | None = None, *, output_attentions: bool = False,
                output_hidden_states: Literal[True]) -> BertOutput: ...
    @overload
    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None,
                token_type_ids: npt.ArrayLike | None = None, *, output_attentions: bool = False,
                output_hidden_states: bool = False) -> _Float | BertOutput: ...
    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None,
                token_type_ids: npt.ArrayLike | None = None, *, output_attentions: bool = False,
                output_hidden_states: bool = False) -> _Float | BertOutput:
        """input_ids (N, L) ints, attention_mask (N, L) 1/0 or bool, token_type_ids
        (N, L) ints -> (N, L, hidden), or a BertOutput (see the class)."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu":
            raise ValueError(f"BertModel: input_ids must be (N, L) integers, got {input_ids.dtype} "
                             f"{input_ids.shape}")
        N, L = input_ids.shape
        token_type_ids = np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids)
        mask = np.ones((N, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != (N, L) or token_type_ids.shape != (N, L):
            raise ValueError(f"BertModel: attention_mask {mask.shape} and token_type_ids "
                             f"{token_type_ids.shape} must be {(N, L)}")
        key_mask = mask.reshape(N, 1, 1, L)        # padded keys are not attended to
        x = self.embeddings(input_ids, token_type_ids)
        hidden_states: Any = [x] if output_hidden_states else None     # lists when asked for
        attentions: Any = [] if output_attentions else None
        for layer in self.encoder.layer:
            if output_attentions:
                x, weights = layer(x, key_mask, True)
                attentions.append(weights)
            else:
                x = layer(x, key_mask)
            if output_hidden_states:
                hidden_states.append(x)
        self._save(x.shape, x.dtype)
        if not (output_attentions or output_hidden_states):
            return x
        return BertOutput(x, None if hidden_states is None else tuple(hidden_states),
                          None if attentions is None else tuple(attentions))

    def _backward(self, grad: npt.ArrayLike) -> None:
        """Runs every layer's backward, last first, stopping where nothing
        below is trainable (a frozen lower stack costs nothing); the token ids
        have no gradient, so this returns None."""
        grad = self._check_grad(grad, *self._saved)
        layers = list(self.encoder.layer)
        trainable_below = self._trainable_below(layers)
        for i in reversed(range(len(layers))):
            if not trainable_below[i]:
                return None
            grad = layers[i].backward(grad)
        if self.embeddings.trainable_parameters():
            self.embeddings.backward(grad)
        return None

    def _trainable_below(self, layers: list[Module]) -> list[bool]:
        """For each layer i: whether it, a layer under it or the embeddings
        has a parameter that is not frozen."""
        below = bool(self.embeddings.trainable_parameters())
        flags = []
        for layer in layers:
            below = below or bool(layer.trainable_parameters())
            flags.append(below)
        return flags

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
                f"intermediate={c.intermediate_size}")
