"""Edge cases an adversarial audit found (issue 9), each with its siblings:
sizes that overflow or are empty, out= overlapping any input, unaligned
arrays, 0-d arrays and arguments of the wrong type."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from attnkit import functional as F
from attnkit import nn, reference

DTYPES = [np.float32, np.float64]
sdpa = attnkit.scaled_dot_product_attention


def broadcast_zeros(shape, dtype=np.float32):
    """A read-only view of `shape` that costs one row of memory however large
    the leading dimension is."""
    return np.broadcast_to(np.zeros((1,) + shape[1:], dtype), shape)


def unaligned(a):
    """A C-contiguous copy of a whose data is not aligned to its item size."""
    raw = np.zeros(a.nbytes + a.itemsize, np.uint8)
    view = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned and view.flags.c_contiguous
    return view


# ---------------------------------------------------------------------------
# 1. Sizes from broadcast views: no overflow, no O(batch) work for an empty result

HUGE = 2**59 + 1


OPTIONS = [{}, {"return_lse": True}, {"return_weights": True}, {"return_weights": "mean"},
           {"is_causal": True}]


# with Ev = 0 only the output is empty: weights or lse would be HUGE rows
@pytest.mark.parametrize("empty, options", [(e, o) for e in ("L", "H", "Ev") for o in OPTIONS
                                            if e != "Ev" or not o.keys() & {"return_lse", "return_weights"}])
def test_attention_empty_result_with_a_huge_broadcast_batch(options, empty):
    L, H, Ev = (0 if empty == "L" else 1), (0 if empty == "H" else 1), (0 if empty == "Ev" else 1)
    q, k = broadcast_zeros((HUGE, H, L, 1)), broadcast_zeros((HUGE, H, 1, 1))
    v = broadcast_zeros((HUGE, H, 1, Ev))
    mask = np.ones((1, 1, 1, 1), bool)
    for kwargs in (options, dict(options, attn_mask=mask)):
        if empty == "H" and options.get("return_weights") == "mean":
            # the head-averaged weights are (HUGE, L, S): not empty, too big to exist
            with pytest.raises(MemoryError):
                sdpa(q, k, v, **kwargs)
            continue
        result = sdpa(q, k, v, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        assert out.shape == (HUGE, H, L, Ev) and out.size == 0


def test_empty_results_cost_no_memory_per_batch_entry():
    """The audit's repro used to write past a wrapped-around malloc (B = 2**59 + 1)
    or take ~800 MB to return nothing (B = 2**25); now both return at once."""
    code = textwrap.dedent("""
        import resource, numpy as np, attnkit
        z = lambda s: np.broadcast_to(np.zeros((1,) + s[1:], np.float32), s)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for B in (2**59 + 1, 2**25, 2**40):
            assert attnkit.scaled_dot_product_attention(z((B, 1, 0, 1)), z((B, 1, 1, 1)),
                                                        z((B, 1, 1, 1))).shape == (B, 1, 0, 1)
            if B > 2**50:
                continue        # (B, 2, 3, 4) below would be too big for NumPy to describe
            out, w, lse = attnkit.scaled_dot_product_attention(
                z((B, 2, 0, 4)), z((B, 2, 3, 4)), z((B, 2, 3, 4)), attn_mask=z((B, 2, 0, 3)),
                return_weights="mean", return_lse=True)
            assert out.shape == (B, 2, 0, 4) and w.shape == (B, 0, 3) and lse.shape == (B, 2, 0)
            assert attnkit.softmax(z((B, 0))).shape == (B, 0)
            assert attnkit.layer_norm(z((B, 0)), 0).shape == (B, 0)
            assert attnkit.rms_norm(z((B, 0)), 0).shape == (B, 0)
            assert attnkit.functional.gelu(z((B, 0))).shape == (B, 0)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown < 50_000, f"{grown} kB"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero", ["B", "H", "L", "S", "E", "Ev"])
@pytest.mark.parametrize("enable_gqa", [False, True])
def test_attention_every_zero_dimension_matches_the_reference(dtype, zero, enable_gqa, rng):
    sizes = dict(B=2, H=2, L=3, S=4, E=5, Ev=3)
    sizes[zero] = 0
    B, H, L, S, E, Ev = (sizes[n] for n in ("B", "H", "L", "S", "E", "Ev"))
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    out, weights, lse = sdpa(q, k, v, return_weights=True, return_lse=True, enable_gqa=enable_gqa)
    mean = sdpa(q, k, v, return_weights="mean", enable_gqa=enable_gqa)[1]
    assert out.shape == (B, H, L, Ev) and weights.shape == (B, H, L, S) and lse.shape == (B, H, L)
    assert mean.shape == (B, L, S)
    assert out.dtype == weights.dtype == lse.dtype == mean.dtype == dtype
    ref_out, ref_weights, ref_lse = reference.scaled_dot_product_attention(q, k, v, dtype=np.float64)
    if S == 0:      # nothing to attend to: 0 and -inf (the reference divides 0 by 0)
        np.testing.assert_array_equal(out, 0)
        assert np.all(lse == -np.inf)
        return
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref_out, atol=tol)
    np.testing.assert_allclose(weights, ref_weights, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, atol=tol)
    np.testing.assert_allclose(mean, ref_weights.mean(axis=1) if H else mean, atol=tol)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))


def test_zero_head_dimension_matches_pytorch(rng):
    """E = 0: every score is an empty dot product, 0, so each query averages the values."""
    from accuracy import torch_or_skip
    torch = torch_or_skip()
    q, k = np.zeros((2, 3, 4, 0), np.float32), np.zeros((2, 3, 6, 0), np.float32)
    v = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)))
    np.testing.assert_allclose(sdpa(q, k, v), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_zero_heads_is_an_empty_result_not_a_gqa_error():
    for H, Hkv, gqa in ((0, 0, False), (0, 0, True), (0, 2, True)):
        q = np.zeros((2, H, 5, 8), np.float32)
        kv = np.zeros((2, Hkv, 6, 8), np.float32)
        out, w = sdpa(q, kv, kv, enable_gqa=gqa, return_weights=True)
        assert out.shape == (2, H, 5, 8) and w.shape == (2, H, 5, 6)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of the key/value heads \(0\)"):
        sdpa(np.zeros((2, 3, 5, 8)), np.zeros((2, 0, 6, 8)), np.zeros((2, 0, 6, 8)), enable_gqa=True)


# ---------------------------------------------------------------------------
# 2. return_weights="mean" on unbatched input

@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_weights_of_unbatched_input_keep_every_query(dtype, rng):
    q = rng.standard_normal((5, 8)).astype(dtype)
    k = rng.standard_normal((7, 8)).astype(dtype)
    out_mean, mean = sdpa(q, k, k, return_weights="mean")
    out_all, weights = sdpa(q, k, k, return_weights=True)
    assert mean.shape == weights.shape == (5, 7)
    np.testing.assert_array_equal(out_mean, out_all)
    np.testing.assert_allclose(mean, weights, rtol=1e-6)   # one head: its mean is itself
    np.testing.assert_allclose(mean, reference.scaled_dot_product_attention(q, k, k)[1], rtol=1e-5)


# ---------------------------------------------------------------------------
# 3. out= overlapping an input: the same answer as without out=

def overlapping_cases(dtype, rng):
    """(name, call(out) -> result, out) with out overlapping an input other than
    being it. Each call takes out=; its expected result comes from copies."""
    buf = rng.standard_normal((3, 8)).astype(dtype)
    x = rng.standard_normal((3, 8)).astype(dtype)
    yield "layer_norm weight", lambda b, o=None: attnkit.layer_norm(x, 8, b[0], b[2], out=o), buf
    yield "layer_norm bias", lambda b, o=None: attnkit.layer_norm(x, 8, None, b[1], out=o), buf
    yield "rms_norm weight", lambda b, o=None: attnkit.rms_norm(x, 8, b[1], out=o), buf
    wide = rng.standard_normal((3, 9)).astype(dtype)     # x and out shifted by one column
    for name, fn in (("softmax", attnkit.softmax), ("log_softmax", attnkit.log_softmax)):
        yield f"{name} shifted", lambda b, o=None, fn=fn: fn(b[:, :8], out=o), wide
    yield "layer_norm shifted", lambda b, o=None: attnkit.layer_norm(b[:, :8], 8, out=o), wide
    yield "rms_norm shifted", lambda b, o=None: attnkit.rms_norm(b[:, :8], 8, out=o), wide
    yield "gelu shifted", lambda b, o=None: F.gelu(b[:, :8], out=o), wide
    yield "silu shifted", lambda b, o=None: F.silu(b[:, :8], out=o), wide
    yield "relu shifted", lambda b, o=None: F.relu(b[:, :8], out=o), wide
    # the axis reduced is not the last: softmax over rows, out the transpose
    square = rng.standard_normal((8, 8)).astype(dtype)
    yield "softmax transposed", lambda b, o=None: attnkit.softmax(b, axis=0, out=o), square


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_overlapping_any_input_gives_the_exact_answer(dtype, rng):
    for name, call, buf in overlapping_cases(dtype, rng):
        expected = call(buf.copy())                         # no overlap: out is fresh
        target = buf[:, 1:] if buf.shape[1] == 9 else (buf.T if buf.shape[0] == buf.shape[1] else buf)
        result = call(buf, target)
        assert result is target, name
        np.testing.assert_array_equal(target, expected, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliasing_a_float_mask_in_softmax_where(dtype, rng):
    """where is bool, so it cannot share out's bytes meaningfully; the float
    attention mask is the one that can, and attention has no out=. What is
    left: out sharing memory with where through a view must still be exact."""
    raw = np.zeros(3 * 8 * np.dtype(dtype).itemsize, np.uint8)
    out = raw.view(dtype).reshape(3, 8)
    where = raw.view(np.bool_)[: 3 * 8].reshape(3, 8)
    x = rng.standard_normal((3, 8)).astype(dtype)
    where[...] = rng.random((3, 8)) < 0.6
    expected = attnkit.softmax(x, where=where.copy())
    attnkit.softmax(x, where=where, out=out)
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------
# 7. Unaligned arrays are accepted everywhere (a copy), as x always was

@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_arrays_everywhere(dtype, rng):
    x = rng.standard_normal((4, 8)).astype(dtype)
    w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
    W = rng.standard_normal((5, 8)).astype(dtype)
    bias5 = rng.standard_normal(5).astype(dtype)
    q, k, v = (rng.standard_normal((2, 3, n, 8)).astype(dtype) for n in (4, 6, 6))
    mask = np.where(rng.random((4, 6)) < 0.7, 0.0, -np.inf).astype(dtype)
    cases = {
        "layer_norm": lambda u: attnkit.layer_norm(u(x), 8, u(w), u(b)),
        "rms_norm": lambda u: attnkit.rms_norm(u(x), 8, u(w)),
        "softmax": lambda u: attnkit.softmax(u(x)),
        "softmax axis 0": lambda u: attnkit.log_softmax(u(x), axis=0),
        "linear": lambda u: F.linear(u(x), u(W), u(bias5)),
        "linear gelu": lambda u: F.linear(u(x), u(W), u(bias5), activation="gelu"),
        "gelu": lambda u: F.gelu(u(x)),
        "gelu tanh": lambda u: F.gelu(u(x), "tanh"),
        "silu": lambda u: F.silu(u(x)),
        "relu": lambda u: F.relu(u(x)),
        "attention float mask": lambda u: sdpa(u(q), u(k), u(v), attn_mask=u(mask)),
        "attention weights": lambda u: sdpa(u(q), u(k), u(v), return_weights="mean")[1],
    }
    for name, call in cases.items():
        np.testing.assert_array_equal(call(unaligned), call(lambda a: a), err_msg=name)


@pytest.mark.parametrize("fn", ["softmax", "layer_norm", "rms_norm", "gelu", "silu", "relu"])
def test_unaligned_out(fn, rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    call = {"softmax": lambda o=None: attnkit.softmax(x, out=o),
            "layer_norm": lambda o=None: attnkit.layer_norm(x, 8, out=o),
            "rms_norm": lambda o=None: attnkit.rms_norm(x, 8, out=o),
            "gelu": lambda o=None: F.gelu(x, out=o), "silu": lambda o=None: F.silu(x, out=o),
            "relu": lambda o=None: F.relu(x, out=o)}[fn]
    out = unaligned(np.zeros_like(x))
    assert call(out) is out
    np.testing.assert_array_equal(out, call())


def test_an_unaligned_parameter_assigned_to_a_layer(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    layer_norm, linear = nn.LayerNorm(8), nn.Linear(8, 4, rng=rng)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    layer_norm.weight, layer_norm.bias = unaligned(w), unaligned(b)
    np.testing.assert_array_equal(layer_norm(x), attnkit.layer_norm(x, 8, w, b))
    expected = linear(x)
    linear.weight, linear.bias = unaligned(linear.weight), unaligned(linear.bias)
    np.testing.assert_array_equal(linear(x), expected)


# ---------------------------------------------------------------------------
# 10. 0-d in, 0-d out; arguments of the wrong type are TypeErrors naming them

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [F.gelu, F.silu, F.relu, F.sigmoid,
                                lambda x, **kw: F.gelu(x, "tanh", **kw)])
def test_zero_dimensional_in_gives_zero_dimensional_out(fn, dtype):
    for x in (dtype(1.5), np.array(-0.5, dtype)):
        result = fn(x)
        assert isinstance(result, np.ndarray) and result.shape == () and result.dtype == dtype
        np.testing.assert_array_equal(result, fn(np.array([x], dtype))[0])
        if fn is not F.sigmoid:
            out = np.empty((), dtype)
            assert fn(x, out=out) is out
            np.testing.assert_array_equal(out, result)


def test_softmax_of_a_zero_dimensional_array():
    x = np.array(3.0, np.float32)
    np.testing.assert_array_equal(attnkit.softmax(x, axis=None), np.array(1.0, np.float32))
    assert attnkit.softmax(x, axis=None).shape == ()
    assert attnkit.log_softmax(x, axis=()).shape == ()


@pytest.mark.parametrize("name, call", [
    ("is_causal", lambda q: sdpa(q, q, q, is_causal="no")),
    ("is_causal", lambda q: sdpa(q, q, q, is_causal=1)),
    ("is_causal", lambda q: sdpa(q, q, q, is_causal=None)),
    ("is_causal", lambda q: sdpa(q, q, q, is_causal=np.array([True]))),
    ("enable_gqa", lambda q: sdpa(q, q, q, enable_gqa="yes")),
    ("return_lse", lambda q: sdpa(q, q, q, return_lse="yes")),
    ("return_weights", lambda q: sdpa(q, q, q, return_weights=1)),
    ("scale", lambda q: sdpa(q, q, q, scale="a")),
    ("scale", lambda q: sdpa(q, q, q, scale="0.5")),
    ("scale", lambda q: sdpa(q, q, q, scale=1j)),
    ("dropout_p", lambda q: sdpa(q, q, q, dropout_p="0.1")),
    ("eps", lambda q: attnkit.layer_norm(q, 8, eps="1e-5")),
    ("eps", lambda q: attnkit.rms_norm(q, 8, eps="1e-5")),
    ("eps", lambda q: attnkit.layer_norm(q, 8, eps=True)),
    ("axis", lambda q: attnkit.softmax(q, axis=True)),
    ("axis", lambda q: attnkit.log_softmax(q, axis=(0, True))),
    ("axis", lambda q: attnkit.softmax(q, axis=1.0)),
    ("normalized_shape", lambda q: attnkit.layer_norm(q, True)),
    ("normalized_shape", lambda q: attnkit.rms_norm(q, (8.0,))),
    ("p", lambda q: F.dropout(q, "0.5")),
    ("training", lambda q: F.dropout(q, 0.5, training="no")),
    ("eps", lambda q: F.batch_norm(q[0], None, None, training=True, eps="1e-5")),
    ("momentum", lambda q: F.batch_norm(q[0], None, None, training=True, momentum="0.1")),
    ("training", lambda q: F.batch_norm(q[0], np.zeros(8), np.ones(8), training="no")),
])
def test_arguments_of_the_wrong_type_name_the_argument(name, call):
    q = np.ones((2, 3, 8), np.float32)
    with pytest.raises(TypeError, match=name):
        call(q)


def test_numpy_scalars_and_zero_dimensional_arrays_are_fine_arguments(rng):
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    expected = sdpa(q, q, q, is_causal=True, scale=0.25)
    for flag in (True, np.True_):
        for scale in (0.25, np.float32(0.25), np.float64(0.25), np.array(0.25)):
            np.testing.assert_array_equal(sdpa(q, q, q, is_causal=flag, scale=scale), expected)
    np.testing.assert_array_equal(attnkit.softmax(q, axis=np.int64(1)), attnkit.softmax(q, axis=1))
    np.testing.assert_array_equal(attnkit.layer_norm(q, np.int32(8), eps=np.float32(1e-5)),
                                  attnkit.layer_norm(q, 8))


def _mha_call(**kwargs):
    x = np.ones((2, 3, 16), np.float32)
    return nn.MultiHeadAttention(16, 4, batch_first=True)(x, x, x, **kwargs)


@pytest.mark.parametrize("name, call", [
    ("eps", lambda: nn.LayerNorm(8, eps="1e-5")),
    ("normalized_shape", lambda: nn.LayerNorm("8")),
    ("normalized_shape", lambda: nn.LayerNorm(8.0)),
    ("normalized_shape", lambda: nn.RMSNorm((8, True))),
    ("eps", lambda: nn.RMSNorm(8, eps="x")),
    ("eps", lambda: nn.BatchNorm1d(4, eps="1e-5")),
    ("momentum", lambda: nn.BatchNorm1d(4, momentum="0.1")),
    ("p", lambda: nn.Dropout("0.5")),
    ("dropout", lambda: nn.MultiHeadAttention(16, 4, dropout="0.1")),
    ("batch_first", lambda: nn.MultiHeadAttention(16, 4, batch_first="no")),
    ("add_zero_attn", lambda: nn.MultiHeadAttention(16, 4, add_zero_attn=1)),
    ("is_causal", lambda: _mha_call(is_causal="no")),
    ("need_weights", lambda: _mha_call(need_weights="no")),
    ("average_attn_weights", lambda: _mha_call(average_attn_weights=1)),
    ("norm_first", lambda: nn.TransformerEncoderLayer(16, 4, 32, norm_first="yes")),
    ("norm_first", lambda: nn.TransformerDecoderLayer(16, 4, 32, norm_first="yes")),
    ("interleaved", lambda: nn.RotaryEmbedding(8, interleaved="no")),
    ("base", lambda: nn.RotaryEmbedding(8, base="1e4")),
    ("base", lambda: nn.SinusoidalPositionalEncoding(8, base="1e4")),
    ("mode", lambda: nn.Linear(4, 4).train("no")),
])
def test_module_arguments_of_the_wrong_type_name_the_argument(name, call):
    with pytest.raises(TypeError, match=name):
        call()


def test_module_dropout_out_of_range():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 1.5"):
        nn.MultiHeadAttention(16, 4, dropout=1.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got -0.1"):
        nn.Dropout(-0.1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 5), (3, 0), (3, 0, 5), (3, 4, 0)])
def test_batch_norm_of_an_empty_batch_is_empty_and_leaves_the_statistics(training, shape):
    C = shape[1]
    x = np.ones(shape, np.float32)
    mean, var = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    result = F.batch_norm(x, mean, var, training=training)
    assert result.shape == shape and result.dtype == np.float32
    np.testing.assert_array_equal(mean, 0.5)
    np.testing.assert_array_equal(var, 2.0)
