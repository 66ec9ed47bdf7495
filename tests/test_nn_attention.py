"""MultiHeadAttention, the KV cache and the Transformer layers, against
reference compositions and against PyTorch with the same weights loaded."""
import itertools

import numpy as np
import pytest

import attnkit
from attnkit import nn, reference
from accuracy import torch_or_skip

DTYPES = [np.float32, np.float64]


def tolerance(expected, dtype):
    """The issue's rule: max abs difference <= 1e-5 (float32) or 1e-10
    (float64) of the output's scale."""
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)      # initial: empty results
    return (1e-5 if np.dtype(dtype) == np.float32 else 1e-10) * scale


def assert_close(actual, expected, dtype):
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance(expected, dtype))


def torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def inputs(rng, dtype, E, kdim, vdim, N, L, S, batch_first, batched=True):
    def shape(length, features):
        if not batched:
            return (length, features)
        return (N, length, features) if batch_first else (length, N, features)
    return (rng.standard_normal(shape(L, E)).astype(dtype),
            rng.standard_normal(shape(S, kdim)).astype(dtype),
            rng.standard_normal(shape(S, vdim)).astype(dtype))


# ---------------------------------------------------------------------------
# Against the reference composition

CONFIGS = [dict(), dict(kdim=6, vdim=5), dict(add_bias_kv=True), dict(add_zero_attn=True),
           dict(add_bias_kv=True, add_zero_attn=True), dict(num_kv_heads=2), dict(num_kv_heads=1),
           dict(bias=False), dict(batch_first=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_mha_matches_reference_composition(simd, dtype, config, rng):
    E, H, N, L, S = 16, 4, 3, 5, 7
    m = nn.MultiHeadAttention(E, H, dtype=dtype, rng=rng, **config).eval()
    bf = config.get("batch_first", False)
    q, k, v = inputs(rng, dtype, E, config.get("kdim", E), config.get("vdim", E), N, L, S, bf)
    kpm = rng.random((N, S)) < 0.3
    kpm[:, 0] = False
    mask = rng.random((L, S)) < 0.2
    mask[:, 1] = False
    out, weights = m(q, k, v, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=False)
    ref_out, ref_weights = reference.multi_head_attention(
        q, k, v, m.state_dict(), H, key_padding_mask=kpm, attn_mask=mask, batch_first=bf,
        add_zero_attn=config.get("add_zero_attn", False))
    assert_close(out, ref_out, dtype)
    assert_close(weights, ref_weights, dtype)


# ---------------------------------------------------------------------------
# Against PyTorch

@pytest.fixture
def torch_nn():
    torch = torch_or_skip()
    # PyTorch's "fast path" (eval, batch_first) is numerically a different
    # computation and zeroes padded positions; compare with the plain one.
    torch.backends.mha.set_fastpath_enabled(False)
    yield torch
    torch.backends.mha.set_fastpath_enabled(True)


TORCH_CASES = [case for case in itertools.product(
    [False, True],                                  # batch_first
    ["none", "bool", "float"],                      # attn_mask kind
    ["none", "bool", "float"],                      # key_padding_mask kind
    [(True, True), (True, False), (False, False)],  # need_weights, average_attn_weights
) if "none" in case[1:3] or case[1] == case[2]]     # PyTorch deprecates mixing the kinds


def test_mha_mixed_mask_kinds_match_reference(rng):
    """A bool attn_mask with a float key_padding_mask (PyTorch warns that
    mixing is deprecated; attnkit adds them as floats)."""
    m = nn.MultiHeadAttention(8, 2, rng=rng).eval().astype(np.float64)
    q, k, v = inputs(rng, np.float64, 8, 8, 8, 2, 4, 5, False)
    mask = rng.random((4, 5)) < 0.3
    mask[:, 0] = False
    kpm = np.where(rng.random((2, 5)) < 0.3, -np.inf, rng.standard_normal((2, 5)))
    kpm[:, 0] = 0.5
    out, weights = m(q, k, v, attn_mask=mask, key_padding_mask=kpm, average_attn_weights=False)
    ref_out, ref_weights = reference.multi_head_attention(q, k, v, m.state_dict(), 2, attn_mask=mask,
                                                          key_padding_mask=kpm)
    assert_close(out, ref_out, np.float64)
    assert_close(weights, ref_weights, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first, mask_kind, kpm_kind, need", TORCH_CASES)
def test_mha_matches_pytorch(torch_nn, dtype, batch_first, mask_kind, kpm_kind, need, rng):
    torch = torch_nn
    E, H, N, L, S = 24, 3, 2, 6, 9
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    tm = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=tdtype).eval()
    m = nn.MultiHeadAttention(E, H, batch_first=batch_first, dtype=dtype).eval()
    m.load_state_dict(torch_state(tm))
    q, k, v = inputs(rng, dtype, E, E, E, N, L, S, batch_first)
    kwargs = dict(need_weights=need[0], average_attn_weights=need[1])
    tkwargs = dict(kwargs)
    visible = rng.random((L, S)) < 0.7
    visible[:, 0] = True  # PyTorch gives NaN for a query with nothing to attend to
    if mask_kind != "none":
        mask = ~visible if mask_kind == "bool" else np.where(visible, 0.0, -np.inf).astype(dtype)
        kwargs["attn_mask"], tkwargs["attn_mask"] = mask, torch.from_numpy(mask)
    if kpm_kind != "none":
        pad = np.zeros((N, S), bool)
        pad[1, S // 2:] = True
        kpm = pad if kpm_kind == "bool" else np.where(pad, -np.inf, 0.0).astype(dtype)
        kwargs["key_padding_mask"], tkwargs["key_padding_mask"] = kpm, torch.from_numpy(kpm)
    to, tw = tm(*(torch.from_numpy(a) for a in (q, k, v)), **tkwargs)
    out, weights = m(q, k, v, **kwargs)
    assert_close(out, to.detach().numpy(), dtype)
    if need[0]:
        assert_close(weights, tw.detach().numpy(), dtype)
    else:
        assert weights is None and tw is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [dict(kdim=10, vdim=7), dict(add_bias_kv=True),
                                    dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True),
                                    dict(bias=False), dict(kdim=10, vdim=7, add_bias_kv=True)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_mha_options_match_pytorch(torch_nn, dtype, config, rng):
    torch = torch_nn
    E, H, N, L, S = 16, 4, 3, 5, 8
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    tm = torch.nn.MultiheadAttention(E, H, dtype=tdtype, **config).eval()
    m = nn.MultiHeadAttention(E, H, dtype=dtype, **config).eval()
    assert list(m.state_dict()) == list(tm.state_dict())
    m.load_state_dict(torch_state(tm))
    q, k, v = inputs(rng, dtype, E, config.get("kdim", E), config.get("vdim", E), N, L, S, False)
    kpm = np.zeros((N, S), bool)
    kpm[0, -3:] = True
    to, tw = tm(*(torch.from_numpy(a) for a in (q, k, v)), key_padding_mask=torch.from_numpy(kpm))
    out, weights = m(q, k, v, key_padding_mask=kpm)
    assert_close(out, to.detach().numpy(), dtype)
    assert_close(weights, tw.detach().numpy(), dtype)


def test_mha_unbatched_and_causal_match_pytorch(torch_nn, rng):
    torch = torch_nn
    tm = torch.nn.MultiheadAttention(12, 3).eval()
    m = nn.MultiHeadAttention(12, 3).eval()
    m.load_state_dict(torch_state(tm))
    x = rng.standard_normal((7, 12)).astype(np.float32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    to, tw = tm(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(x), attn_mask=causal,
                is_causal=True)
    out, weights = m(x, x, x, is_causal=True)  # attnkit needs no mask for causality
    assert_close(out, to.detach().numpy(), np.float32)
    assert_close(weights, tw.detach().numpy(), np.float32)
    out2, _ = m(x, x, x, attn_mask=causal.numpy())  # and the float mask means the same
    assert_close(out2, out, np.float32)


def test_mha_default_initialisation_is_pytorchs():
    """Same distributions as PyTorch's: Xavier-uniform in_proj_weight,
    kaiming-uniform (a = sqrt 5) out_proj.weight, Xavier-normal bias_k/bias_v,
    zero biases. Each sample's spread is checked against the formula, within
    four standard errors, for attnkit and for PyTorch alike."""
    torch = torch_or_skip()
    E = 64
    expected_std = {
        "in_proj_weight": np.sqrt(6 / (E + 3 * E)) / np.sqrt(3),
        "out_proj.weight": (1 / np.sqrt(E)) / np.sqrt(3),
        "bias_k": np.sqrt(2 / (E + E)),
        "bias_v": np.sqrt(2 / (E + E)),
    }
    m = nn.MultiHeadAttention(E, 8, add_bias_kv=True, rng=np.random.default_rng(0))
    tm = torch.nn.MultiheadAttention(E, 8, add_bias_kv=True)
    assert list(m.state_dict()) == list(tm.state_dict())
    for (name, a), t in zip(m.state_dict().items(), tm.state_dict().values()):
        t = t.detach().numpy()
        assert a.shape == t.shape and a.dtype == t.dtype
        if name not in expected_std:
            np.testing.assert_array_equal(a, 0)
            np.testing.assert_array_equal(t, 0)
            continue
        std = expected_std[name]
        for sample in (a, t):
            assert abs(sample.std() - std) < 4 * std / np.sqrt(2 * sample.size), name


# ---------------------------------------------------------------------------
# What users ask (TOPICS #9-13)

@pytest.mark.parametrize("E, heads", [(64, [1, 2, 4, 8, 16]), (384, [1, 6, 12])])
def test_parameter_count_does_not_grow_with_heads(E, heads):
    """4 E^2 + 4 E whatever the number of heads (TOPICS #12)."""
    for H in heads:
        assert nn.MultiHeadAttention(E, H).num_parameters() == 4 * E * E + 4 * E


def test_heads_are_concatenated_then_projected_once(rng):
    """The output is concat(head_1, ..., head_H) @ out_proj.weight.T + bias:
    no activation, no softmax (TOPICS #9-11); each head's weights are
    available for inspection (TOPICS #13)."""
    E, H, L = 12, 3, 5
    m = nn.MultiHeadAttention(E, H, batch_first=True, rng=rng).eval()
    x = rng.standard_normal((1, L, E))
    m.astype(np.float64)
    out, weights = m(x, x, x, average_attn_weights=False)        # (1, H, L, L) per head
    Wq, Wk, Wv = np.split(m.in_proj_weight, 3)
    bq, bk, bv = np.split(m.in_proj_bias, 3)
    d = E // H
    heads = []
    for h in range(H):
        cols = slice(h * d, (h + 1) * d)
        qh = x[0] @ Wq[cols].T + bq[cols]
        kh = x[0] @ Wk[cols].T + bk[cols]
        vh = x[0] @ Wv[cols].T + bv[cols]
        w = attnkit.softmax(qh @ kh.T / np.sqrt(d))
        np.testing.assert_allclose(weights[0, h], w, atol=1e-12)
        heads.append(w @ vh)
    expected = np.concatenate(heads, axis=-1) @ m.out_proj.weight.T + m.out_proj.bias
    np.testing.assert_allclose(out[0], expected, atol=1e-12)


def test_fully_masked_query_gives_zero_not_nan(rng):
    m = nn.MultiHeadAttention(8, 2, batch_first=True, bias=False, rng=rng).eval()
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    mask = np.zeros((4, 4), bool)
    mask[1] = True  # query 1 may attend to nothing (True = hidden)
    out, weights = m(x, x, x, attn_mask=mask)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    np.testing.assert_array_equal(out[:, 1], 0)      # no bias: the zero head output stays zero
    np.testing.assert_array_equal(weights[:, 1], 0)


def test_self_attention_is_one_call_with_query_key_value_the_same(rng):
    """TOPICS #8: self-attention is attention with q, k, v from one sequence;
    each token may attend to itself."""
    m = nn.MultiHeadAttention(8, 2, batch_first=True, rng=rng).eval()
    x = rng.standard_normal((1, 6, 8)).astype(np.float32)
    out_same, w = m(x, x, x)
    out_copies, _ = m(x, x.copy(), x.copy())   # separate products, same result
    np.testing.assert_allclose(out_same, out_copies, atol=1e-6)
    assert np.all(np.diagonal(w[0]) > 0)


def test_cross_attention_lengths_and_padding(rng):
    """TOPICS #17: queries from the decoder (L), keys and values from the
    encoder (S != L, other feature sizes), padded keys ignored."""
    m = nn.MultiHeadAttention(16, 4, kdim=10, vdim=6, batch_first=True, rng=rng).eval()
    dec = rng.standard_normal((2, 3, 16)).astype(np.float32)
    enc = rng.standard_normal((2, 9, 10)).astype(np.float32)
    val = rng.standard_normal((2, 9, 6)).astype(np.float32)
    pad = np.zeros((2, 9), bool)
    pad[1, 5:] = True
    out, weights = m(dec, enc, val, key_padding_mask=pad)
    assert out.shape == (2, 3, 16) and weights.shape == (2, 3, 9)
    np.testing.assert_array_equal(weights[1, :, 5:], 0)
    # the padded keys' contents do not matter
    enc2, val2 = enc.copy(), val.copy()
    enc2[1, 5:] = 1e3
    val2[1, 5:] = -1e3
    out2, _ = m(dec, enc2, val2, key_padding_mask=pad)
    np.testing.assert_allclose(out2, out, atol=1e-6)


# ---------------------------------------------------------------------------
# The KV cache

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("steps", [[1] * 9, [4, 1, 1, 3], [9]])
def test_kv_cache_steps_equal_the_full_causal_pass(dtype, num_kv_heads, steps, rng):
    m = nn.MultiHeadAttention(16, 4, batch_first=True, num_kv_heads=num_kv_heads, dtype=dtype, rng=rng).eval()
    x = rng.standard_normal((2, sum(steps), 16)).astype(dtype)
    full, _ = m(x, x, x, is_causal=True, need_weights=False)
    cache = nn.KVCache()
    parts, start = [], 0
    for n in steps:
        step = x[:, start:start + n]
        out, _ = m(step, step, step, is_causal=True, need_weights=False, kv_cache=cache)
        parts.append(out)
        start += n
    assert len(cache) == sum(steps)
    assert_close(np.concatenate(parts, axis=1), full, dtype)


def test_kv_cache_refuses_what_does_not_fit(rng):
    m = nn.MultiHeadAttention(8, 2, batch_first=True, rng=rng)
    cache = nn.KVCache()
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    m(x, x, x, kv_cache=cache)
    with pytest.raises(ValueError, match="do not fit the cached ones"):
        m(x[:1], x[:1], x[:1], kv_cache=cache)
    cache.reset()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="does not combine"):
        nn.MultiHeadAttention(8, 2, add_bias_kv=True, batch_first=True)(x, x, x, kv_cache=nn.KVCache())


# ---------------------------------------------------------------------------
# Transformer layers

LAYER_CASES = list(itertools.product([False, True], ["relu", "gelu"], [False, True]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first, activation, batch_first", LAYER_CASES)
def test_encoder_layer_matches_pytorch(torch_nn, dtype, norm_first, activation, batch_first, rng):
    torch = torch_nn
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    kwargs = dict(dim_feedforward=40, dropout=0.1, activation=activation, batch_first=batch_first,
                  norm_first=norm_first)
    t = torch.nn.TransformerEncoderLayer(16, 4, dtype=tdtype, **kwargs).eval()
    a = nn.TransformerEncoderLayer(16, 4, dtype=dtype, **kwargs).eval()
    assert list(a.state_dict()) == list(t.state_dict())
    a.load_state_dict(torch_state(t))
    x = rng.standard_normal((3, 7, 16) if batch_first else (7, 3, 16)).astype(dtype)
    pad = np.zeros((3, 7), bool)
    pad[2, 4:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=tdtype)
    for kw, tkw in [({}, {}),
                    (dict(src_key_padding_mask=pad), dict(src_key_padding_mask=torch.from_numpy(pad))),
                    (dict(is_causal=True), dict(src_mask=causal, is_causal=True))]:
        expected = t(torch.from_numpy(x), **tkw).detach().numpy()
        assert_close(a(x, **kw), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first, activation, batch_first", LAYER_CASES)
def test_decoder_layer_matches_pytorch(torch_nn, dtype, norm_first, activation, batch_first, rng):
    torch = torch_nn
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    kwargs = dict(dim_feedforward=40, dropout=0.1, activation=activation, batch_first=batch_first,
                  norm_first=norm_first)
    t = torch.nn.TransformerDecoderLayer(16, 4, dtype=tdtype, **kwargs).eval()
    a = nn.TransformerDecoderLayer(16, 4, dtype=dtype, **kwargs).eval()
    assert list(a.state_dict()) == list(t.state_dict())
    a.load_state_dict(torch_state(t))
    tgt = rng.standard_normal((2, 5, 16) if batch_first else (5, 2, 16)).astype(dtype)
    mem = rng.standard_normal((2, 8, 16) if batch_first else (8, 2, 16)).astype(dtype)
    mem_pad = np.zeros((2, 8), bool)
    mem_pad[0, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=tdtype)
    T = torch.from_numpy
    expected = t(T(tgt), T(mem), tgt_mask=causal, tgt_is_causal=True,
                 memory_key_padding_mask=T(mem_pad)).detach().numpy()
    assert_close(a(tgt, mem, tgt_is_causal=True, memory_key_padding_mask=mem_pad), expected, dtype)


def test_stacks_match_pytorch(torch_nn, rng):
    torch = torch_nn
    T = torch.from_numpy
    te = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32), 3,
                                     norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    ae = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32), 3, norm=nn.LayerNorm(16)).eval()
    assert list(ae.state_dict()) == list(te.state_dict())
    ae.load_state_dict(torch_state(te))
    td = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 4, 32), 2).eval()
    ad = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32), 2).eval()
    ad.load_state_dict(torch_state(td))
    src = rng.standard_normal((6, 2, 16)).astype(np.float32)
    tgt = rng.standard_normal((4, 2, 16)).astype(np.float32)
    memory = ae(src)
    assert_close(memory, te(T(src)).detach().numpy(), np.float32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4)
    assert_close(ad(tgt, memory, tgt_is_causal=True),
                 td(T(tgt), T(memory), tgt_mask=causal, tgt_is_causal=True).detach().numpy(), np.float32)
    assert ae.num_parameters() == sum(p.numel() for p in te.parameters())
    assert ad.num_parameters() == sum(p.numel() for p in td.parameters())


def test_layers_are_independent_copies_and_freeze_by_name(rng):
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, rng=rng), 2)
    enc.layers[0].linear1.weight[...] = 0
    assert np.any(enc.layers[1].linear1.weight != 0)
    total = enc.num_parameters()
    enc.freeze("layers.0")
    frozen = enc.layers[0].num_parameters()
    assert enc.num_parameters(trainable_only=True) == total - frozen
    assert all(not name.startswith("layers.0.") for name, _ in enc.trainable_parameters())
    enc.unfreeze()
    assert enc.num_parameters(trainable_only=True) == total


def test_dropout_only_while_training(rng):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True, rng=rng)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    a, b = layer(x), layer(x)          # training: dropout draws differ
    assert not np.allclose(a, b)
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))


# ---------------------------------------------------------------------------
# Empty batches and sequences: empty results of PyTorch's shapes

EMPTY_SHAPES = [(0, 5, 5), (0, 5, 7), (2, 0, 5), (2, 5, 0), (0, 0, 0), (2, 0, 0)]   # N, L, S
EMPTY_CONFIGS = [dict(), dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=6, vdim=5)]


def _torch_call(module, args, kwargs):
    """module(*args, **kwargs) in PyTorch, as numpy. Where PyTorch itself fails
    on an empty batch (its need_weights=False path reshapes a mask with a -1
    that 0 elements make ambiguous), its need_weights=True path gives the
    output to compare with, and the weights are None as asked."""
    try:
        out, weights = module(*args, **kwargs)
    except RuntimeError as e:
        assert "ambiguous" in str(e) and kwargs.get("need_weights") is False
        out, weights = module(*args, **dict(kwargs, need_weights=True))[0], None
    return out.detach().numpy(), None if weights is None else weights.detach().numpy()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("N, L, S", EMPTY_SHAPES)
@pytest.mark.parametrize("config", EMPTY_CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_mha_empty_batch_or_sequence_matches_pytorch(torch_nn, batch_first, N, L, S, config, rng):
    torch = torch_nn
    E, H = 16, 4
    t = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, **config).eval()
    with torch.no_grad():      # biases that show: with S = 0, the output is out_proj.bias
        t.in_proj_bias.normal_()
        t.out_proj.bias.normal_()
    a = nn.MultiHeadAttention(E, H, batch_first=batch_first, **config).eval()
    a.load_state_dict(torch_state(t))
    q, k, v = inputs(rng, np.float32, E, config.get("kdim", E), config.get("vdim", E), N, L, S, batch_first)
    kpm = np.zeros((N, S), bool)
    kpm[:, S // 2:] = True
    masks = [{}, dict(key_padding_mask=kpm), dict(attn_mask=rng.random((L, S)) < 0.3),
             dict(attn_mask=rng.standard_normal((N * H, L, S)).astype(np.float32))]
    for mask in masks:
        for need, average in [(True, True), (True, False), (False, True)]:
            kwargs = dict(mask, need_weights=need, average_attn_weights=average)
            out, weights = a(q, k, v, **kwargs)
            expected_out, expected_weights = _torch_call(
                t, [torch.from_numpy(x) for x in (q, k, v)],
                {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                 for key, value in kwargs.items()})
            assert out.dtype == np.float32 and np.isfinite(out).all()
            assert_close(out, expected_out, np.float32)
            if need:
                assert_close(weights, expected_weights, np.float32)
            else:
                assert weights is None and expected_weights is None


def test_mha_audit_example_empty_self_attention(torch_nn):
    torch = torch_nn
    t = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    a = nn.MultiHeadAttention(16, 4, batch_first=True).eval()
    a.load_state_dict(torch_state(t))
    x0 = np.zeros((0, 5, 16), np.float32)
    out, weights = a(x0, x0, x0)                      # q is k is v: the packed projection
    expected_out, expected_weights = t(*[torch.from_numpy(x0)] * 3)
    assert out.shape == tuple(expected_out.shape) == (0, 5, 16)
    assert weights.shape == tuple(expected_weights.shape) == (0, 5, 5)
    out, weights = a(x0, x0, x0, need_weights=False, average_attn_weights=False, is_causal=True)
    assert out.shape == (0, 5, 16) and weights is None
    assert a(x0, x0, x0, average_attn_weights=False)[1].shape == (0, 4, 5, 5)


def test_mha_unbatched_empty_sequences_match_pytorch(torch_nn, rng):
    torch = torch_nn
    t = torch.nn.MultiheadAttention(8, 2).eval()
    with torch.no_grad():
        t.out_proj.bias.normal_()
    a = nn.MultiHeadAttention(8, 2).eval()
    a.load_state_dict(torch_state(t))
    for L, S in [(0, 3), (2, 0), (0, 0)]:
        q, k, v = inputs(rng, np.float32, 8, 8, 8, None, L, S, False, batched=False)
        out, weights = a(q, k, v)
        expected_out, expected_weights = t(*[torch.from_numpy(x) for x in (q, k, v)])
        assert_close(out, expected_out.detach().numpy(), np.float32)
        assert_close(weights, expected_weights.detach().numpy(), np.float32)
    # nothing to attend to: the heads give 0, never NaN, and out_proj adds its bias
    out, _ = a(rng.standard_normal((2, 8)).astype(np.float32), np.zeros((0, 8), np.float32),
               np.zeros((0, 8), np.float32))
    np.testing.assert_array_equal(out, np.broadcast_to(a.out_proj.bias, (2, 8)))


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_kv_cache_with_an_empty_batch(num_kv_heads, rng):
    m = nn.MultiHeadAttention(8, 2, batch_first=True, num_kv_heads=num_kv_heads, rng=rng).eval()
    cache = nn.KVCache()
    for step, expected_length in [(3, 3), (1, 4), (0, 4), (2, 6)]:
        x = np.zeros((0, step, 8), np.float32)
        out, weights = m(x, x, x, kv_cache=cache, is_causal=True)
        assert out.shape == (0, step, 8) and weights.shape == (0, step, expected_length)
        assert len(cache) == expected_length


def _empty_layer_inputs(torch, batch_first, N, L):
    shape = (N, L, 16) if batch_first else (L, N, 16)
    x = np.random.default_rng(N + L).standard_normal(shape).astype(np.float32)
    return x, torch.from_numpy(x)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("N, L", [(0, 5), (2, 0), (0, 0)])
def test_encoder_layer_empty_batch_or_sequence_matches_pytorch(torch_nn, batch_first, norm_first, N, L):
    torch = torch_nn
    kwargs = dict(dim_feedforward=32, batch_first=batch_first, norm_first=norm_first)
    t = torch.nn.TransformerEncoderLayer(16, 4, **kwargs).eval()
    a = nn.TransformerEncoderLayer(16, 4, **kwargs).eval()
    a.load_state_dict(torch_state(t))
    x, tx = _empty_layer_inputs(torch, batch_first, N, L)
    pad = np.zeros((N, L), bool)
    expected = t(tx).detach().numpy()      # PyTorch fails on the empty padding mask (see _torch_call);
    for kw in [{}, dict(src_key_padding_mask=pad), dict(is_causal=True)]:    # all-False is no mask
        out = a(x, **kw)
        assert out.shape == expected.shape == x.shape
        assert_close(out, expected, np.float32)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("N, L, S", [(0, 4, 6), (2, 0, 6), (2, 4, 0), (0, 0, 0)])
def test_decoder_layer_empty_batch_or_sequence_matches_pytorch(torch_nn, batch_first, norm_first, N, L, S):
    torch = torch_nn
    kwargs = dict(dim_feedforward=32, batch_first=batch_first, norm_first=norm_first)
    t = torch.nn.TransformerDecoderLayer(16, 4, **kwargs).eval()
    with torch.no_grad():
        t.multihead_attn.out_proj.bias.normal_()
    a = nn.TransformerDecoderLayer(16, 4, **kwargs).eval()
    a.load_state_dict(torch_state(t))
    tgt, ttgt = _empty_layer_inputs(torch, batch_first, N, L)
    memory, tmemory = _empty_layer_inputs(torch, batch_first, N, S)
    expected = t(ttgt, tmemory, tgt_is_causal=True,
                 tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(L)).detach().numpy()
    for kw in [{}, dict(memory_key_padding_mask=np.zeros((N, S), bool),
                        tgt_key_padding_mask=np.zeros((N, L), bool))]:
        out = a(tgt, memory, tgt_is_causal=True, **kw)
        assert out.shape == expected.shape == tgt.shape and np.isfinite(out).all()
        assert_close(out, expected, np.float32)


@pytest.mark.parametrize("batch_first", [False, True])
def test_stacks_take_an_empty_batch_as_pytorch_does(torch_nn, batch_first):
    torch = torch_nn
    layer = dict(dim_feedforward=32, batch_first=batch_first)
    te = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, **layer), 2,
                                     norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    ae = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, **layer), 2, norm=nn.LayerNorm(16)).eval()
    ae.load_state_dict(torch_state(te))
    td = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(16, 4, **layer), 2).eval()
    ad = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, **layer), 2).eval()
    ad.load_state_dict(torch_state(td))
    for N, L, S in [(0, 4, 6), (2, 0, 3), (2, 3, 0)]:
        src, tsrc = _empty_layer_inputs(torch, batch_first, N, S)
        tgt, ttgt = _empty_layer_inputs(torch, batch_first, N, L)
        memory = ae(src, src_key_padding_mask=np.zeros((N, S), bool))
        assert_close(memory, te(tsrc).detach().numpy(), np.float32)
        out = ad(tgt, memory, tgt_is_causal=True)
        expected = td(ttgt, torch.from_numpy(memory), tgt_is_causal=True,
                      tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(L)).detach().numpy()
        assert out.shape == expected.shape == tgt.shape
        assert_close(out, expected, np.float32)


# ---------------------------------------------------------------------------
# Bad input

def test_bad_input_names_the_problem(rng):
    m = nn.MultiHeadAttention(8, 2, rng=rng)
    x = rng.standard_normal((4, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="divisible"):
        nn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match=r"with 8 features, got shape \(4, 2, 6\)"):
        m(x[..., :6], x, x)
    with pytest.raises(TypeError, match="dtype float64 but the parameters are float32"):
        m(x.astype(np.float64), x, x)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(2, 4\), got \(4, 2\)"):
        m(x, x, x, key_padding_mask=np.zeros((4, 2), bool))
    with pytest.raises(ValueError, match=r"attn_mask must be \(4, 4\) or \(4, 4, 4\), got \(3, 4\)"):
        m(x, x, x, attn_mask=np.zeros((3, 4), bool))
    with pytest.raises(TypeError, match="must be bool or float"):
        m(x, x, x, attn_mask=np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="disagree"):
        m(x, x[:, :1], x[:, :1])
    state = m.state_dict()
    with pytest.raises(KeyError, match="missing keys: out_proj.bias"):
        nn.MultiHeadAttention(8, 2).load_state_dict({k: v for k, v in state.items() if k != "out_proj.bias"})
    bad = dict(state, in_proj_weight=np.zeros((24, 7), np.float32))
    with pytest.raises(ValueError, match=r"'in_proj_weight' has shape \(24, 7\) in the state dict but \(24, 8\)"):
        nn.MultiHeadAttention(8, 2).load_state_dict(bad)
