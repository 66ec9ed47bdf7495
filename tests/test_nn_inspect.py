"""What a learner looks at inside the attention modules: each head's output
before the merge, Wq/Wk/Wv as named views of the packed projection, and the
transformer layers' attention weights."""
import numpy as np
import pytest

from attnkit import nn


def randn(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_each_heads_output_merges_into_the_output(batch_first, batched, training):
    rng = np.random.default_rng(0)
    m = nn.MultiHeadAttention(12, 3, batch_first=batch_first, dtype=np.float64, rng=rng).train(training)
    shape = ((2, 5, 12) if batch_first else (5, 2, 12)) if batched else (5, 12)
    x = randn(rng, shape)
    out, weights, heads = m(x, x, x, return_heads=True)
    assert heads.shape == ((2, 3, 5, 4) if batched else (3, 5, 4))
    merged = np.moveaxis(heads, -3, -2).reshape(heads.shape[:-3] + (5, 12))   # heads side by side
    expected = merged @ m.out_proj.weight.T + m.out_proj.bias
    if batched and not batch_first:
        expected = expected.swapaxes(0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    plain_out, plain_weights = m(x, x, x)
    np.testing.assert_allclose(out, plain_out, rtol=1e-12, atol=1e-12)


def test_q_k_v_weights_are_views_of_the_packed_projection():
    rng = np.random.default_rng(1)
    m = nn.MultiHeadAttention(8, 2, batch_first=True, rng=rng)
    W, b = m.in_proj_weight, m.in_proj_bias
    for i, name in enumerate("qkv"):
        np.testing.assert_array_equal(getattr(m, f"{name}_weight"), W[8 * i:8 * (i + 1)])
        assert np.shares_memory(getattr(m, f"{name}_weight"), W)
        assert np.shares_memory(getattr(m, f"{name}_bias"), b)
    m.k_weight = np.eye(8)
    m.v_bias = np.arange(8)
    np.testing.assert_array_equal(W[8:16], np.eye(8))
    np.testing.assert_array_equal(b[16:], np.arange(8))
    assert "k_weight" not in m.state_dict()                 # names of views, not new parameters
    with pytest.raises(ValueError, match=r"q_weight: expected shape \(8, 8\), got \(8, 4\)"):
        m.q_weight = np.zeros((8, 4))


def test_q_k_v_weights_of_separate_projections_and_no_bias():
    rng = np.random.default_rng(2)
    m = nn.MultiHeadAttention(8, 2, kdim=5, vdim=3, bias=False, rng=rng)
    assert m.k_weight is m.k_proj_weight and m.v_weight.shape == (8, 3)
    assert m.q_bias is None
    with pytest.raises(AttributeError, match="bias=False"):
        m.q_bias = np.zeros(8)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_encoder_layer_returns_its_self_attention_weights(norm_first, training):
    rng = np.random.default_rng(3)
    layer = nn.TransformerEncoderLayer(12, 3, 24, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       dtype=np.float64, rng=rng).train(training)
    x = randn(rng, (2, 5, 12))
    pad = np.zeros((2, 5), bool)
    pad[1, 3:] = True
    out, weights = layer(x, src_key_padding_mask=pad, need_weights=True)
    np.testing.assert_allclose(out, layer(x, src_key_padding_mask=pad), rtol=1e-12, atol=1e-12)
    attn_input = layer.norm1(x) if norm_first else x
    _, expected = layer.self_attn(attn_input, attn_input, attn_input, key_padding_mask=pad,
                                  average_attn_weights=False)
    assert weights.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(weights[1, :, :, 3:], 0)       # padded keys get no weight
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_decoder_layer_returns_self_and_cross_attention_weights(norm_first, training):
    rng = np.random.default_rng(4)
    layer = nn.TransformerDecoderLayer(12, 3, 24, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       dtype=np.float64, rng=rng).train(training)
    tgt, memory = randn(rng, (2, 5, 12)), randn(rng, (2, 7, 12))
    out, (self_weights, cross_weights) = layer(tgt, memory, tgt_is_causal=True, need_weights=True)
    np.testing.assert_allclose(out, layer(tgt, memory, tgt_is_causal=True), rtol=1e-12, atol=1e-12)
    assert self_weights.shape == (2, 3, 5, 5) and cross_weights.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(np.triu(self_weights, 1), 0)    # causal: no later position
    np.testing.assert_allclose(self_weights.sum(-1), 1, rtol=1e-12)
    np.testing.assert_allclose(cross_weights.sum(-1), 1, rtol=1e-12)
    if training:                                          # the gradient is the output's, as before
        grad = randn(rng, out.shape)
        d_tgt, d_memory = layer.backward(grad)
        assert d_tgt.shape == tgt.shape and d_memory.shape == memory.shape
