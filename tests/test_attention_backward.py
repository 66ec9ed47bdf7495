"""scaled_dot_product_attention_backward against attnkit.reference, float64
central differences and torch.autograd, over the forward's sweeps."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from attnkit import reference
from accuracy import assert_accurate, torch_or_skip
from test_attention import mask_of, randn
from threads import thread_count

sdpa = attnkit.scaled_dot_product_attention
sdpa_backward = attnkit.scaled_dot_product_attention_backward
DTYPES = [np.float32, np.float64]
REFERENCE_KEYS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "causal_alignment",
                  "dropout_seed")


def forward_backward(q, k, v, g, **kwargs):
    out, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    return out, lse, sdpa_backward(g, q, k, v, out, lse, **kwargs)


def cancellation_slack(q, k, v, g, scale=None):
    """dq and dk are sums of P * (dP - D) times k (or q), and dP - D cancels
    to 0 where one key takes all the weight: allow a few ulps of those terms'
    size (dv has no such difference)."""
    scale = scale or 1 / np.sqrt(max(q.shape[-1], 1))
    dp = np.max(np.abs(g), initial=0) * np.max(np.abs(v), initial=0) * np.sqrt(v.shape[-1])
    eps = np.finfo(q.dtype).eps
    return (8 * eps * scale * dp * np.max(np.abs(k), initial=0) * np.sqrt(k.shape[-2]),
            8 * eps * scale * dp * np.max(np.abs(q), initial=0) * np.sqrt(q.shape[-2]), 0.0)


def check(q, k, v, factor=4.0, g=None, rng=None, **kwargs):
    """The three gradients against the reference by the accuracy rule; inputs
    untouched; the gradients have the inputs' shapes and dtype."""
    if g is None:
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) if not kwargs.get("enable_gqa") \
            else np.broadcast_shapes(q.shape[:-3], k.shape[:-3]) + q.shape[-3:-2]
        g = randn(rng or np.random.default_rng(0), lead + (q.shape[-2], v.shape[-1]), q.dtype)
    before = [a.copy() for a in (q, k, v, g)]
    out, lse, grads = forward_backward(q, k, v, g, **kwargs)
    ref_kwargs = {key: kwargs[key] for key in REFERENCE_KEYS if key in kwargs}
    atols = cancellation_slack(q, k, v, g, kwargs.get("scale"))
    for index, (grad, x) in enumerate(zip(grads, (q, k, v))):
        assert grad.shape == x.shape and grad.dtype == q.dtype
        assert_accurate(grad, lambda dt: reference.scaled_dot_product_attention_backward(
            g, q, k, v, dtype=dt, **ref_kwargs)[index], q.dtype, factor, atol=atols[index])
    for a, b in zip((q, k, v, g), before):
        np.testing.assert_array_equal(a, b)
    return grads


# ---------------------------------------------------------------------------
# Shapes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, S", [(1, 1), (1, 300), (7, 7), (59, 113), (113, 59), (64, 72),
                                  (65, 73), (257, 130), (130, 1023)])
def test_lengths(simd, dtype, L, S, rng):
    q, k, v = randn(rng, (2, 3, L, 16), dtype), randn(rng, (2, 3, S, 16), dtype), randn(rng, (2, 3, S, 16), dtype)
    check(q, k, v, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E, Ev", [(1, 1), (7, 13), (64, 64), (59, 64), (64, 33), (128, 17), (256, 256)])
def test_head_dims(simd, dtype, E, Ev, rng):
    L, S = 70, 90
    q, k, v = randn(rng, (2, L, E), dtype), randn(rng, (2, S, E), dtype), randn(rng, (2, S, Ev), dtype)
    check(q, k, v, rng=rng)


@pytest.mark.parametrize("H, Hkv", [(8, 8), (8, 4), (8, 1), (6, 3), (1, 1)])
@pytest.mark.parametrize("L, S", [(33, 77), (1, 300), (130, 130)])
def test_grouped_query_attention(simd, H, Hkv, L, S, rng):
    q = randn(rng, (2, H, L, 24), np.float32)
    k, v = randn(rng, (2, Hkv, S, 24), np.float32), randn(rng, (2, Hkv, S, 24), np.float32)
    check(q, k, v, enable_gqa=True, rng=rng)


def test_broadcast_inputs_sum_their_gradients(simd, rng):
    """A key shared by the batch and the heads collects every use's gradient."""
    q = randn(rng, (3, 4, 20, 8), np.float64)
    k, v = randn(rng, (1, 1, 30, 8), np.float64), randn(rng, (30, 8), np.float64)
    dq, dk, dv = check(q, k, v, rng=rng)
    assert dk.shape == (1, 1, 30, 8) and dv.shape == (30, 8)


def test_two_dimensional_inputs(simd, rng):
    q, k, v = randn(rng, (9, 8), np.float64), randn(rng, (11, 8), np.float64), randn(rng, (11, 5), np.float64)
    check(q, k, v, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed_heads", "negative_strides", "strided_last_axis", "fortran"])
def test_non_contiguous_inputs(simd, dtype, layout, rng):
    B, H, L, S, E = 2, 3, 29, 41, 16
    if layout == "transposed_heads":  # (B, L, H, E) seen as (B, H, L, E), as after a projection
        q, k, v = (np.swapaxes(randn(rng, (B, n, H, E), dtype), 1, 2) for n in (L, S, S))
    elif layout == "negative_strides":
        q, k, v = (randn(rng, (B, H, n, E), dtype)[::-1, :, ::-1] for n in (L, S, S))
    elif layout == "strided_last_axis":
        q, k, v = (randn(rng, (B, H, n, 2 * E), dtype)[..., ::2] for n in (L, S, S))
    else:
        q, k, v = (np.asfortranarray(randn(rng, (B, H, n, E), dtype)) for n in (L, S, S))
    g = np.swapaxes(randn(rng, (B, L, H, E), dtype), 1, 2)   # the gradient strided too
    check(q, k, v, g=g)


def test_empty_and_degenerate_shapes(rng):
    f = np.float64
    # no queries: nothing reaches k and v
    q, k, v = randn(rng, (2, 0, 8), f), randn(rng, (2, 5, 8), f), randn(rng, (2, 5, 4), f)
    dq, dk, dv = forward_backward(q, k, v, np.zeros((2, 0, 4)))[2]
    assert dq.shape == (2, 0, 8) and np.all(dk == 0) and np.all(dv == 0)
    # no keys: every query attends to nothing
    q, k, v = randn(rng, (2, 3, 8), f), randn(rng, (2, 0, 8), f), randn(rng, (2, 0, 4), f)
    dq, dk, dv = forward_backward(q, k, v, randn(rng, (2, 3, 4), f))[2]
    assert np.all(dq == 0) and dk.shape == (2, 0, 8) and dv.shape == (2, 0, 4)
    # Ev = 0: no gradient at all; E = 0: the weights are uniform and only v learns
    q, k, v = randn(rng, (3, 8), f), randn(rng, (4, 8), f), np.zeros((4, 0))
    dq, dk, dv = forward_backward(q, k, v, np.zeros((3, 0)))[2]
    assert np.all(dq == 0) and np.all(dk == 0) and dv.shape == (4, 0)
    g = randn(rng, (3, 6), f)
    dq, dk, dv = forward_backward(np.zeros((3, 0)), np.zeros((4, 0)), randn(rng, (4, 6), f), g)[2]
    assert dq.shape == (3, 0) and dk.shape == (4, 0)
    np.testing.assert_allclose(dv, np.tile(g.sum(0) / 4, (4, 1)))
    # a zero-size batch
    z = np.zeros((0, 2, 3, 8), np.float32)
    grads = forward_backward(z, z, z, z)[2]
    assert all(a.shape == z.shape for a in grads)


# ---------------------------------------------------------------------------
# Masks, causality, dropout

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", ["(L,S)", "(S,)", "key_padding", "(B,H,L,S)", "(1,H,1,1)"])
def test_masks_broadcast(simd, dtype, kind, mask_shape, rng):
    B, H, L, S, E = 2, 3, 37, 80, 16
    shape = {"(L,S)": (L, S), "(S,)": (S,), "key_padding": (B, 1, 1, S), "(B,H,L,S)": (B, H, L, S),
             "(1,H,1,1)": (1, H, 1, 1)}[mask_shape]
    mask = mask_of(kind, shape, rng, dtype)
    if mask_shape == "(1,H,1,1)" and kind == "bool":
        mask[0, 0] = True
    q, k, v = randn(rng, (B, H, L, E), dtype), randn(rng, (B, H, S, E), dtype), randn(rng, (B, H, S, E), dtype)
    check(q, k, v, attn_mask=mask, rng=rng)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L, S", [(1, 1), (1, 300), (7, 7), (64, 200), (200, 64), (257, 1023), (300, 300)])
def test_causal(simd, alignment, L, S, rng):
    q, k, v = randn(rng, (2, L, 32), np.float32), randn(rng, (2, S, 32), np.float32), randn(rng, (2, S, 32), np.float32)
    check(q, k, v, is_causal=True, causal_alignment=alignment, rng=rng)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_causal_with_a_key_padding_mask(simd, kind, alignment, rng):
    B, H, L, S = 2, 2, 70, 150
    mask = mask_of(kind, (B, 1, 1, S), rng, np.float32)
    q, k, v = randn(rng, (B, H, L, 16), np.float32), randn(rng, (B, H, S, 16), np.float32), randn(rng, (B, H, S, 16), np.float32)
    check(q, k, v, attn_mask=mask, is_causal=True, causal_alignment=alignment, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zero_gradients_never_nan(simd, dtype, rng):
    B, H, L, S = 2, 2, 100, 300
    q, k, v = randn(rng, (B, H, L, 16), dtype), randn(rng, (B, H, S, 16), dtype), randn(rng, (B, H, S, 16), dtype)
    mask = rng.random((B, H, L, S)) < 0.5
    mask[0, 1, 3] = False         # one row sees nothing
    mask[1, :, 40:90] = False     # whole blocks of rows see nothing
    g = randn(rng, (B, H, L, 16), dtype)
    dq, dk, dv = check(q, k, v, g=g, attn_mask=mask)
    assert np.all(dq[0, 1, 3] == 0) and np.all(dq[1, :, 40:90] == 0)
    # all keys masked for everyone: every gradient is exactly 0
    grads = forward_backward(q, k, v, g, attn_mask=np.zeros(S, bool))[2]
    assert all(np.all(a == 0) for a in grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_scores(simd, dtype, rng):
    """Scores in the thousands. P comes back as exp(S - lse), and lse was
    rounded to the dtype: every P of a row is off by the same factor
    1 + ulp(lse)/2, so the gradients' relative error may reach |lse| * eps
    (as in PyTorch's and FlashAttention's backward, which do the same)."""
    q, k, v = randn(rng, (2, 40, 16), dtype, 30.0), randn(rng, (2, 90, 16), dtype, 30.0), randn(rng, (2, 90, 16), dtype)
    g = randn(rng, (2, 40, 16), dtype)
    out, lse, grads = forward_backward(q, k, v, g)
    expected = reference.scaled_dot_product_attention_backward(
        g, q, k, v, dtype=np.float64 if dtype == np.float32 else np.longdouble)
    lse_error = float(np.max(np.abs(lse))) * np.finfo(dtype).eps
    for ours, exact, slack in zip(grads, expected, cancellation_slack(q, k, v, g)):
        size = float(np.max(np.abs(exact)))
        bound = lse_error * size + 16 * np.finfo(dtype).eps * size + slack
        assert float(np.max(np.abs(ours - exact))) <= bound
    # and at ordinary scale the same shapes meet the usual rule
    check(q / 30, k / 30, v, g=g)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_replays_the_forward_pattern(simd, dropout_p, causal, rng):
    q, k, v = randn(rng, (2, 3, 50, 16), np.float64), randn(rng, (2, 3, 90, 16), np.float64), randn(rng, (2, 3, 90, 16), np.float64)
    seed = 12345
    check(q, k, v, dropout_p=dropout_p, dropout_seed=seed, is_causal=causal, rng=rng)
    # the forward's output with that seed is the reference's, with the same kept pattern
    out = sdpa(q, k, v, dropout_p=dropout_p, dropout_seed=seed, is_causal=causal)
    ref = reference.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed,
                                                 is_causal=causal)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_dropout_needs_the_seed_and_a_generator_or_a_seed(rng):
    q = randn(rng, (4, 8), np.float32)
    out, lse = sdpa(q, q, q, dropout_p=0.5, dropout_seed=7, return_lse=True)
    with pytest.raises(ValueError, match="dropout_seed"):
        sdpa_backward(q[:, :8], q, q, q, out, lse, dropout_p=0.5)
    with pytest.raises(ValueError, match="not both"):
        sdpa(q, q, q, dropout_p=0.5, dropout_seed=7, rng=rng)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="dropout_seed"):
            sdpa(q, q, q, dropout_p=0.5, dropout_seed=bad)
    with pytest.raises(TypeError, match="dropout_seed"):
        sdpa(q, q, q, dropout_p=0.5, dropout_seed=1.5)
    # the same seed drops the same weights: a generator-drawn seed given explicitly reproduces it
    seed = int(np.random.default_rng(3).integers(0, 2**32, dtype=np.uint64))
    np.testing.assert_array_equal(sdpa(q, q, q, dropout_p=0.5, rng=np.random.default_rng(3)),
                                  sdpa(q, q, q, dropout_p=0.5, dropout_seed=seed))


# ---------------------------------------------------------------------------
# Finite differences and PyTorch

def test_float64_central_differences(rng):
    """Each gradient element against (f(x + h) - f(x - h)) / 2h of
    f = sum(grad_out * out), for every feature at once."""
    B, H, Hkv, L, S, E, Ev = 1, 4, 2, 6, 9, 5, 3
    q, k, v = randn(rng, (B, H, L, E), np.float64), randn(rng, (B, Hkv, S, E), np.float64), randn(rng, (B, Hkv, S, Ev), np.float64)
    mask = rng.standard_normal((L, S))
    mask[2, :] = -np.inf   # a row that sees nothing
    g = randn(rng, (B, H, L, Ev), np.float64)
    kwargs = dict(attn_mask=mask, is_causal=True, causal_alignment="bottom_right", enable_gqa=True,
                  scale=0.7, dropout_p=0.3, dropout_seed=99)
    grads = forward_backward(q, k, v, g, **kwargs)[2]

    def f(q, k, v):
        return float(np.sum(g * sdpa(q, k, v, **kwargs)))

    h = 1e-6
    for which, (x, grad) in enumerate(zip((q, k, v), grads)):
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            args = [q, k, v]
            plus, minus = x.copy(), x.copy()
            plus[index] += h
            minus[index] -= h
            args[which] = plus
            up = f(*args)
            args[which] = minus
            numeric[index] = (up - f(*args)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", ["plain", "causal", "causal_l_neq_s", "bool_mask", "float_mask", "gqa",
                                  "scale", "ragged_ev", "key_padding"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_pytorch_autograd(simd, case, dtype, rng):
    torch = torch_or_skip()
    B, H, L, S, E, Ev = 2, 4, 45, 45 if case.startswith("causal") and case != "causal_l_neq_s" else 77, 32, 32
    Hkv = 2 if case == "gqa" else H
    if case == "ragged_ev":
        Ev = 19
    q, k, v = randn(rng, (B, H, L, E), dtype), randn(rng, (B, Hkv, S, E), dtype), randn(rng, (B, Hkv, S, Ev), dtype)
    g = randn(rng, (B, H, L, Ev), dtype)
    kwargs, tkwargs = {}, {}
    if case.startswith("causal"):
        kwargs["is_causal"] = tkwargs["is_causal"] = True
    if case == "bool_mask":
        mask = rng.random((L, S)) < 0.8
        mask[:, 0] = True
        kwargs["attn_mask"], tkwargs["attn_mask"] = mask, torch.from_numpy(mask)
    if case in ("float_mask", "key_padding"):
        shape = (L, S) if case == "float_mask" else (B, 1, 1, S)
        mask = randn(rng, shape, dtype)
        kwargs["attn_mask"], tkwargs["attn_mask"] = mask, torch.from_numpy(mask)
    if case == "gqa":
        kwargs["enable_gqa"] = tkwargs["enable_gqa"] = True
    if case == "scale":
        kwargs["scale"] = tkwargs["scale"] = 0.37
    grads = forward_backward(q, k, v, g, **kwargs)[2]
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **tkwargs).backward(torch.from_numpy(g))
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), **tol)


# ---------------------------------------------------------------------------
# Determinism, memory, errors

@pytest.mark.parametrize("B, H, Hkv, L, S, E", [(1, 1, 1, 300, 700, 64), (1, 8, 2, 200, 300, 33),
                                                (4, 2, 2, 130, 150, 16), (1, 2, 2, 1, 5000, 64)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bitwise_identical_across_thread_counts(simd, B, H, Hkv, L, S, E, dropout_p, rng):
    q, k, v = randn(rng, (B, H, L, E), np.float32), randn(rng, (B, Hkv, S, E), np.float32), randn(rng, (B, Hkv, S, E), np.float32)
    g = randn(rng, (B, H, L, E), np.float32)
    kwargs = dict(enable_gqa=True, is_causal=True, causal_alignment="bottom_right", dropout_p=dropout_p,
                  dropout_seed=5)
    out, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    results = []
    for n in (1, 2, 3):
        with thread_count(n):
            results.append(sdpa_backward(g, q, k, v, out, lse, **kwargs))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_extra_memory_does_not_grow_with_length():
    """L = S = 4096, H = 8: the weights alone would be 512 MB; beyond the
    inputs and the gradients the backward may use a few tens of MB."""
    code = textwrap.dedent("""
        import resource, numpy as np, attnkit
        H, L, E = 8, 4096, 64
        rng = np.random.default_rng(0)
        q, k, v, g = (rng.standard_normal((1, H, L, E)).astype(np.float32) for _ in range(4))
        out, lse = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
        small = [a[:, :, :64] for a in (g, q, k, v)]
        attnkit.scaled_dot_product_attention_backward(*small, out[:, :, :64], lse[:, :, :64])  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grads = attnkit.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024 - sum(a.nbytes for a in grads))
    """)
    extra = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, cwd="/").stdout)
    assert extra < 48 * 2**20, f"{extra / 2**20:.1f} MB beyond the gradients"


def test_bad_input_raises_clear_errors(rng):
    q = randn(rng, (2, 3, 5, 8), np.float32)
    out, lse = sdpa(q, q, q, return_lse=True)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 3, 5, 7\), expected \(2, 3, 5, 8\)"):
        sdpa_backward(out[..., :7], q, q, q, out, lse)
    with pytest.raises(ValueError, match="lse has shape"):
        sdpa_backward(out, q, q, q, out, lse[..., :4])
    with pytest.raises(ValueError, match="out has shape"):
        sdpa_backward(out, q, q, q, out[:1], lse)
    with pytest.raises(TypeError, match="grad_out must have the query's dtype float32, got float64"):
        sdpa_backward(out.astype(np.float64), q, q, q, out, lse)
    with pytest.raises(TypeError, match="float16"):
        sdpa_backward(out.astype(np.float16), q, q, q, out, lse)
    with pytest.raises(ValueError, match="do not broadcast"):
        sdpa_backward(out, q, np.concatenate([q, q, q[:1]])[:3], q, out, lse)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        sdpa_backward(out, q, q, q, out, lse, dropout_p=1.5, dropout_seed=1)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        sdpa_backward(out, q, q, q, out, lse, attn_mask=np.ones((4, 4), bool))
