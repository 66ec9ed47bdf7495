"""Backward of the transformer layers and stacks (attnkit.nn.transformer)
against PyTorch's, with the same weights, in training mode (dropout 0, so
that both sides compute one function; dropout's own backward is tested in
test_nn_backward and test_nn_attention_backward)."""
import numpy as np
import pytest

from attnkit import nn
from accuracy import torch_or_skip
from gradients import check_finite_differences, check_module
from threads import thread_count

DTYPES = [np.float32, np.float64]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]


def torch_activation(torch, name):
    return {"relu": "relu", "gelu": "gelu", "gelu_tanh": torch.nn.GELU("tanh"),
            "silu": torch.nn.functional.silu}[name]


def our_activation(name):
    return nn.GELU("tanh") if name == "gelu_tanh" else name


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def layer_pair(torch, kind, dtype, activation="relu", **kwargs):
    kwargs = dict(dim_feedforward=24, dropout=0.0, **kwargs)
    ours = getattr(nn, kind)(12, 3, activation=our_activation(activation), dtype=dtype,
                             rng=np.random.default_rng(0), **kwargs)
    theirs = getattr(torch.nn, kind)(12, 3, activation=torch_activation(torch, activation), **kwargs)
    for _, p in ours.named_parameters():            # biases and norms away from their 0 and 1 starts
        p += (0.1 * np.random.default_rng(1).standard_normal(p.shape)).astype(dtype)
    return ours, theirs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_layer(dtype, norm_first, activation, batch_first):
    torch = torch_or_skip()
    ours, theirs = layer_pair(torch, "TransformerEncoderLayer", dtype, activation,
                              norm_first=norm_first, batch_first=batch_first)
    src = randn(np.random.default_rng(2), (2, 5, 12) if batch_first else (5, 2, 12), dtype)
    check_module(ours, theirs, [src], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_decoder_layer(dtype, norm_first, activation):
    torch = torch_or_skip()
    ours, theirs = layer_pair(torch, "TransformerDecoderLayer", dtype, activation,
                              norm_first=norm_first, batch_first=True)
    rng = np.random.default_rng(3)
    tgt, memory = randn(rng, (2, 5, 12), dtype), randn(rng, (2, 7, 12), dtype)
    check_module(ours, theirs, [tgt, memory], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(dtype):
    torch = torch_or_skip()
    rng = np.random.default_rng(4)
    causal = np.triu(np.ones((5, 5), bool), 1)
    padding = np.zeros((2, 5), bool)
    padding[1, 3:] = True
    ours, theirs = layer_pair(torch, "TransformerEncoderLayer", dtype, batch_first=True)
    check_module(ours, theirs, [randn(rng, (2, 5, 12), dtype)], dtype,
                 call=lambda m, x: m(x, src_mask=causal, src_key_padding_mask=padding),
                 torch_call=lambda m, x: m(x, src_mask=torch.from_numpy(causal),
                                           src_key_padding_mask=torch.from_numpy(padding)))
    memory_padding = np.zeros((2, 7), bool)
    memory_padding[0, 5:] = True
    ours, theirs = layer_pair(torch, "TransformerDecoderLayer", dtype, batch_first=True, norm_first=True)
    check_module(ours, theirs, [randn(rng, (2, 5, 12), dtype), randn(rng, (2, 7, 12), dtype)], dtype,
                 call=lambda m, t, s: m(t, s, tgt_mask=causal, tgt_is_causal=True,
                                        memory_key_padding_mask=memory_padding),
                 torch_call=lambda m, t, s: m(t, s, tgt_mask=torch.from_numpy(causal), tgt_is_causal=True,
                                              memory_key_padding_mask=torch.from_numpy(memory_padding)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacks(dtype):
    torch = torch_or_skip()
    rng = np.random.default_rng(5)
    layer, torch_layer = layer_pair(torch, "TransformerEncoderLayer", dtype, "gelu", batch_first=True)
    ours = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(12, dtype=dtype))
    theirs = torch.nn.TransformerEncoder(torch_layer, 3, norm=torch.nn.LayerNorm(12),
                                         enable_nested_tensor=False)
    check_module(ours, theirs, [randn(rng, (2, 5, 12), dtype)], dtype)
    layer, torch_layer = layer_pair(torch, "TransformerDecoderLayer", dtype, batch_first=True)
    ours = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(12, dtype=dtype))
    theirs = torch.nn.TransformerDecoder(torch_layer, 2, norm=torch.nn.LayerNorm(12))
    check_module(ours, theirs, [randn(rng, (2, 5, 12), dtype), randn(rng, (2, 4, 12), dtype)], dtype)


def test_eval_forward_is_unchanged_by_training_mode():
    """The fused eval path and the training path (each child in turn)
    compute the same function."""
    rng = np.random.default_rng(6)
    for kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        for norm_first in (False, True):
            layer = getattr(nn, kind)(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True,
                                      norm_first=norm_first, dtype=np.float64, rng=rng)
            inputs = [randn(rng, (2, 6, 16), np.float64) for _ in range(1 + kind.startswith("TransformerDec"))]
            trained = layer.train()(*inputs)
            evaluated = layer.eval()(*inputs)
            np.testing.assert_allclose(trained, evaluated, rtol=1e-12, atol=1e-12)
            assert all(m._saved is None for _, m in layer.named_modules())


def test_frozen_layers():
    torch = torch_or_skip()
    ours, theirs = layer_pair(torch, "TransformerEncoderLayer", np.float64, batch_first=True)
    check_module(ours, theirs, [randn(np.random.default_rng(7), (2, 5, 12), np.float64)], np.float64,
                 frozen=("self_attn.in_proj_weight", "linear1.weight", "norm2.bias"))


def test_an_activation_without_backward_says_so():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=np.tanh, batch_first=True)
    x = np.ones((1, 3, 8), np.float32)
    layer(x)
    with pytest.raises(NotImplementedError, match="has no backward"):
        layer.backward(np.ones_like(x))


def test_gradients_are_bitwise_the_same_at_1_2_and_3_threads():
    rng = np.random.default_rng(8)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True, rng=rng)
    tgt, memory = randn(rng, (3, 20, 32), np.float32), randn(rng, (3, 24, 32), np.float32)
    grad = randn(rng, (3, 20, 32), np.float32)
    results = []
    for threads in (1, 2, 3):
        with thread_count(threads):
            for _, m in layer.named_modules():          # the same dropout masks in both runs
                if hasattr(m, "rng"):
                    m.rng = np.random.default_rng(9)
            layer.zero_grad()
            layer(tgt, memory, tgt_is_causal=True)
            d = layer.backward(grad)
            results.append((d, {k: v.copy() for k, v in layer.grads().items()}))
    for other in results[1:]:
        for a, b in zip(results[0][0], other[0]):
            np.testing.assert_array_equal(a, b)
        for name, g in results[0][1].items():
            np.testing.assert_array_equal(g, other[1][name])


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoding_with_kv_caches_equals_the_full_causal_pass(norm_first):
    rng = np.random.default_rng(10)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=norm_first,
                                       dtype=np.float64, rng=rng)
    decoder = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(16, dtype=np.float64)).eval()
    tgt, memory = randn(rng, (2, 6, 16), np.float64), randn(rng, (2, 5, 16), np.float64)
    full = decoder(tgt, memory, tgt_is_causal=True,
                   tgt_mask=np.triu(np.ones((6, 6), bool), 1))
    caches = [nn.KVCache() for _ in range(decoder.num_layers)]
    steps = [decoder(tgt[:, :2], memory, kv_caches=caches)]     # a prompt, then one at a time
    steps += [decoder(tgt[:, i:i + 1], memory, kv_caches=caches) for i in range(2, 6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one KVCache per layer"):
        decoder(tgt, memory, kv_caches=caches[:1])
    decoder.train()
    with pytest.raises(ValueError, match="eval mode"):
        decoder(tgt, memory, kv_caches=[nn.KVCache(), nn.KVCache()])


@pytest.mark.parametrize("kind", ["TransformerEncoderLayer", "TransformerDecoderLayer"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_float64_finite_differences(kind, norm_first):
    """The layers' backward is the derivative of their training forward,
    without PyTorch: central differences along random directions."""
    rng = np.random.default_rng(11)
    layer = getattr(nn, kind)(8, 2, 12, dropout=0.0, activation="gelu", batch_first=True,
                              norm_first=norm_first, dtype=np.float64, rng=rng)
    inputs = [randn(rng, (2, 4, 8), np.float64)]
    if kind == "TransformerDecoderLayer":
        inputs.append(randn(rng, (2, 5, 8), np.float64))
    check_finite_differences(layer, inputs, call=lambda m, *a: m(*a, tgt_is_causal=True)
                             if len(a) == 2 else m(*a))
