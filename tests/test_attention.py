"""scaled_dot_product_attention against attnkit.reference (and PyTorch, if installed)."""
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from attnkit import _runtime, reference
from accuracy import assert_accurate, assert_nonfinite_match, torch_or_skip

sdpa = attnkit.scaled_dot_product_attention
DTYPES = [np.float32, np.float64]
LENGTHS = [1, 7, 64, 113, 257, 1023, 1024, 2048]
HEAD_DIMS = [1, 8, 59, 64, 128, 256]


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def check(q, k, v, factor=4.0, **kwargs):
    """Run the kernel with weights and lse, hold all three to the accuracy
    rule against the reference, check the inputs are untouched, return them."""
    before = [a.copy() for a in (q, k, v)]
    out, weights, lse = sdpa(q, k, v, return_weights=True, return_lse=True, **kwargs)
    ref_kwargs = {key: kwargs[key] for key in ("attn_mask", "is_causal", "scale", "enable_gqa",
                                               "causal_alignment") if key in kwargs}
    for index, result in enumerate((out, weights, lse)):
        assert_accurate(result, lambda dt: reference.scaled_dot_product_attention(
            q, k, v, dtype=dt, **ref_kwargs)[index], q.dtype, factor)
    for a, b in zip((q, k, v), before):
        np.testing.assert_array_equal(a, b)
    # without weights and lse, the same output
    np.testing.assert_array_equal(sdpa(q, k, v, **kwargs), out)
    return out, weights, lse


# ---------------------------------------------------------------------------
# Shapes

@pytest.mark.parametrize("L, S", list(itertools.product(LENGTHS, LENGTHS)))
def test_every_length_pair(L, S, rng):
    H = 2 if L * S <= 1024 * 1024 else 1
    q, k, v = (randn(rng, (H, n, 64), np.float32) for n in (L, S, S))
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("L, S", [(113, 257), (7, 1023), (1, 2048), (64, 64)])
def test_head_dims(simd, dtype, E, L, S, rng):
    if dtype == np.float64 and L * S > 100000:
        pytest.skip("float64 checks run on the smaller shapes (the long-double reference is slow)")
    Ev = {1: 3, 8: 8, 59: 64, 64: 59, 128: 128, 256: 40}[E]  # Ev == E and Ev != E both
    q, k, v = randn(rng, (2, L, E), dtype), randn(rng, (2, S, E), dtype), randn(rng, (2, S, Ev), dtype)
    check(q, k, v)


@pytest.mark.parametrize("H, Hkv", [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3), (1, 1)])
@pytest.mark.parametrize("L, S", [(33, 77), (1, 300), (130, 130)])
def test_grouped_query_attention(simd, H, Hkv, L, S, rng):
    q = randn(rng, (2, H, L, 32), np.float32)
    k, v = randn(rng, (2, Hkv, S, 32), np.float32), randn(rng, (2, Hkv, S, 24), np.float32)
    check(q, k, v, enable_gqa=True)


def test_batch_dimensions_broadcast(simd, rng):
    q = randn(rng, (3, 1, 4, 20, 16), np.float32)
    k = randn(rng, (1, 2, 4, 30, 16), np.float32)
    v = randn(rng, (2, 1, 30, 12), np.float32)  # heads broadcast too
    out, _, _ = check(q, k, v)
    assert out.shape == (3, 2, 4, 20, 12)


def test_two_dimensional_inputs(simd, rng):
    q, k, v = randn(rng, (9, 5), np.float64), randn(rng, (11, 5), np.float64), randn(rng, (11, 3), np.float64)
    out, weights, lse = check(q, k, v)
    assert out.shape == (9, 3) and weights.shape == (9, 11) and lse.shape == (9,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed_heads", "transposed_heads_ragged_v", "negative_strides",
                                    "strided_last_axis", "unaligned", "fortran"])
def test_non_contiguous_inputs(simd, dtype, layout, rng):
    B, H, L, S, E = 2, 3, 29, 41, 16
    if layout == "transposed_heads":  # (B, L, H, E) seen as (B, H, L, E), as after a projection
        q = np.swapaxes(randn(rng, (B, L, H, E), dtype), 1, 2)
        k = np.swapaxes(randn(rng, (B, S, H, E), dtype), 1, 2)
        v = np.swapaxes(randn(rng, (B, S, H, E), dtype), 1, 2)
    elif layout == "transposed_heads_ragged_v":  # the kernel packs v's rows, zero-padded
        q = np.swapaxes(randn(rng, (B, L, H, E), dtype), 1, 2)
        k = np.swapaxes(randn(rng, (B, S, H, E), dtype), 1, 2)
        v = np.swapaxes(randn(rng, (B, S, H, 13), dtype), 1, 2)
    elif layout == "negative_strides":
        q, k, v = (randn(rng, (B, H, n, E), dtype)[::-1, :, ::-1] for n in (L, S, S))
    elif layout == "strided_last_axis":
        q, k, v = (randn(rng, (B, H, n, 2 * E), dtype)[..., ::2] for n in (L, S, S))
    elif layout == "unaligned":
        def unaligned(shape):
            a = randn(rng, shape, dtype)
            return np.frombuffer(b"\0" + a.tobytes(), dtype, offset=1).reshape(shape)
        q, k, v = unaligned((B, H, L, E)), unaligned((B, H, S, E)), unaligned((B, H, S, E))
    else:
        q, k, v = (np.asfortranarray(randn(rng, (B, H, n, E), dtype)) for n in (L, S, S))
    check(q, k, v)


def test_empty_and_degenerate_shapes(rng):
    q, k, v = randn(rng, (2, 0, 8), np.float32), randn(rng, (2, 5, 8), np.float32), randn(rng, (2, 5, 4), np.float32)
    assert sdpa(q, k, v).shape == (2, 0, 4)
    out, weights, lse = sdpa(randn(rng, (2, 3, 8), np.float32), randn(rng, (2, 0, 8), np.float32),
                             randn(rng, (2, 0, 4), np.float32), return_weights=True, return_lse=True)
    np.testing.assert_array_equal(out, 0)  # no keys: nothing to attend to
    assert weights.shape == (2, 3, 0) and np.all(lse == -np.inf)
    assert sdpa(randn(rng, (0, 2, 3, 8), np.float32), randn(rng, (0, 2, 5, 8), np.float32),
                randn(rng, (0, 2, 5, 8), np.float32)).shape == (0, 2, 3, 8)
    # E = 0: every score is 0, so the output is the mean of the values
    v = randn(rng, (4, 6), np.float64)
    np.testing.assert_allclose(sdpa(np.zeros((3, 0)), np.zeros((4, 0)), v), np.tile(v.mean(0), (3, 1)))


# ---------------------------------------------------------------------------
# Masks and causality

def mask_of(kind, shape, rng, dtype):
    """A random mask of `shape`: bool (True = attend) or additive float."""
    visible = rng.random(shape) < 0.7
    if kind == "bool":
        return visible
    return np.where(visible, rng.standard_normal(shape), -np.inf).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", ["(L,S)", "(S,)", "key_padding", "(B,H,L,S)", "(1,H,1,1)",
                                        "(L,1)", "transposed", "(B,1,L,S)"])
def test_masks_broadcast(simd, dtype, kind, mask_shape, rng):
    B, H, L, S = 2, 3, 50, 131
    q, k, v = randn(rng, (B, H, L, 24), dtype), randn(rng, (B, H, S, 24), dtype), randn(rng, (B, H, S, 16), dtype)
    shape = {"(L,S)": (L, S), "(S,)": (S,), "key_padding": (B, 1, 1, S), "(B,H,L,S)": (B, H, L, S),
             "(1,H,1,1)": (1, H, 1, 1), "(L,1)": (L, 1), "transposed": (S, L), "(B,1,L,S)": (B, 1, L, S)}[mask_shape]
    mask = mask_of(kind, shape, rng, dtype)
    if mask_shape == "transposed":
        mask = mask.T
    before = mask.copy()
    check(q, k, v, attn_mask=mask)
    np.testing.assert_array_equal(mask, before)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L, S", [(1, 1), (1, 300), (7, 7), (64, 200), (200, 64), (257, 1023), (300, 300)])
def test_causal(simd, alignment, L, S, rng):
    q, k, v = randn(rng, (2, L, 32), np.float32), randn(rng, (2, S, 32), np.float32), randn(rng, (2, S, 32), np.float32)
    out, weights, lse = check(q, k, v, is_causal=True, causal_alignment=alignment)
    offset = 0 if alignment == "top_left" else S - L
    hidden = np.arange(S)[None, :] > np.arange(L)[:, None] + offset
    assert np.all(weights[:, hidden] == 0)
    empty = hidden.all(axis=1)  # bottom-right with L > S: the first rows see nothing
    np.testing.assert_array_equal(out[:, empty], 0)
    assert np.all(lse[:, empty] == -np.inf) and np.all(np.isfinite(lse[:, ~empty]))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L, S", [(70, 90), (300, 500), (5, 700), (200, 130)])
def test_causal_with_a_key_padding_mask(simd, kind, alignment, L, S, rng):
    """A mask the same for every query, with causality on top: a tile is
    skipped only if no query of the block sees any key of it (the kernel once
    looked at the block's first query only, and skipped tiles later queries see)."""
    q, k, v = randn(rng, (2, 3, L, 16), np.float32), randn(rng, (2, 3, S, 16), np.float32), randn(rng, (2, 3, S, 16), np.float32)
    mask = mask_of(kind, (2, 1, 1, S), rng, np.float32)
    check(q, k, v, attn_mask=mask, is_causal=True, causal_alignment=alignment)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, S", [(5, 9), (100, 300), (1, 3000)])
def test_fully_masked_rows_give_zero_never_nan(simd, dtype, L, S, rng):
    q, k, v = randn(rng, (2, L, 16), dtype), randn(rng, (2, S, 16), dtype), randn(rng, (2, S, 8), dtype)
    mask = rng.random((2, L, S)) < 0.5
    mask[0, 0] = False          # one row with nothing to attend to
    mask[1, :, : S // 2] = False
    fmask = np.where(mask, 0.0, -np.inf).astype(dtype)
    for m in (mask, fmask):
        out, weights, lse = check(q, k, v, attn_mask=m)
        np.testing.assert_array_equal(out[0, 0], 0)
        np.testing.assert_array_equal(weights[0, 0], 0)
        assert lse[0, 0] == -np.inf
        assert not np.isnan(out).any() and not np.isnan(weights).any()
    # every key hidden: the whole output is 0
    out = sdpa(q, k, v, attn_mask=np.zeros(S, bool))
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_and_tiny_scores(simd, dtype, rng):
    q = randn(rng, (2, 40, 16), dtype, scale=300.0)  # scores in the tens of thousands: one-hot rows
    k, v = randn(rng, (2, 150, 16), dtype, scale=30.0), randn(rng, (2, 150, 16), dtype)
    out, weights, _ = check(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-5)
    check(q * 1e-30, k, v)  # scores ~0: uniform weights


def test_nan_in_a_query_makes_its_row_nan(rng):
    q, k, v = randn(rng, (4, 16), np.float32), randn(rng, (200, 16), np.float32), randn(rng, (200, 8), np.float32)
    q[2, 3] = np.nan
    out, weights, lse = sdpa(q, k, v, return_weights=True, return_lse=True)
    assert np.isnan(out[2]).all() and np.isnan(weights[2]).all() and np.isnan(lse[2])
    assert np.isfinite(out[[0, 1, 3]]).all()


# ---------------------------------------------------------------------------
# Dropout

def test_dropout_is_reproducible_and_matches_the_reference(simd, rng):
    q, k, v = randn(rng, (2, 3, 60, 16), np.float32), randn(rng, (2, 3, 250, 16), np.float32), randn(rng, (2, 3, 250, 8), np.float32)
    p = 0.3
    a = sdpa(q, k, v, dropout_p=p, rng=np.random.default_rng(7), return_weights=True, return_lse=True)
    b = sdpa(q, k, v, dropout_p=p, rng=np.random.default_rng(7), return_weights=True, return_lse=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = sdpa(q, k, v, dropout_p=p, rng=np.random.default_rng(8))
    assert not np.array_equal(a[0], c)
    seed = int(np.random.default_rng(7).integers(0, 2**32, dtype=np.uint64))
    for index in range(3):
        assert_accurate(a[index], lambda dt: reference.scaled_dot_product_attention(
            q, k, v, dropout_p=p, dropout_seed=seed, dtype=dt)[index], np.float32)
    keep = reference.dropout_keep_mask(seed, (2, 3, 60, 250), p)
    assert abs(keep.mean() - (1 - p)) < 0.01
    np.testing.assert_array_equal(a[1] == 0, ~keep)
    # the output without weights is the same computation
    np.testing.assert_array_equal(sdpa(q, k, v, dropout_p=p, rng=np.random.default_rng(7)), a[0])


def test_dropout_extremes(rng):
    q, k, v = randn(rng, (5, 8), np.float32), randn(rng, (9, 8), np.float32), randn(rng, (9, 4), np.float32)
    np.testing.assert_array_equal(sdpa(q, k, v, dropout_p=1.0, rng=np.random.default_rng(0)), 0)
    np.testing.assert_array_equal(sdpa(q, k, v, dropout_p=0.0), sdpa(q, k, v))
    assert sdpa(q, k, v, dropout_p=0.5).shape == (5, 4)  # rng=None: fresh entropy


# ---------------------------------------------------------------------------
# Threads and the split of long keys

@pytest.mark.parametrize("L, S", [(300, 700), (1, 5000), (3, 2500), (48, 3000)])
def test_bitwise_identical_across_thread_counts(simd, L, S, rng):
    q, k, v = randn(rng, (2, 4, L, 32), np.float32), randn(rng, (2, 4, S, 32), np.float32), randn(rng, (2, 4, S, 32), np.float32)
    mask = rng.random(S) < 0.9
    before = attnkit.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            attnkit.set_num_threads(n)
            results.append(sdpa(q, k, v, attn_mask=mask, return_lse=True))
    finally:
        attnkit.set_num_threads(before)
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


def test_long_keys_split_matches_unsplit_reference(simd, rng):
    """Short queries over many keys are computed in chunks merged by their
    log-sum-exp; that must agree with the plain computation."""
    q, k, v = randn(rng, (3, 2, 40), np.float32), randn(rng, (3, 5000, 40), np.float32), randn(rng, (3, 5000, 40), np.float32)
    mask = rng.random((3, 2, 5000)) < 0.5
    mask[1, :, 1300:] = False  # whole chunks with nothing visible
    mask[2, 0] = False         # a row with nothing at all
    check(q, k, v, attn_mask=mask)


def test_extra_memory_does_not_grow_with_length():
    """The naive computation would need L*S*4 = 268 MB for its scores here."""
    code = textwrap.dedent("""
        import resource, numpy as np, attnkit
        L = S = 8192
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, n, 64)).astype(np.float32) for n in (L, S, S))
        out = attnkit.scaled_dot_product_attention(q[:, :64], k[:, :64], v[:, :64])  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = attnkit.scaled_dot_product_attention(q, k, v)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024 - out.nbytes)
    """)
    extra = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, cwd="/").stdout)
    assert extra < 16 * 2**20, f"{extra / 2**20:.1f} MB beyond the output"


# ---------------------------------------------------------------------------
# Bad input

def test_bad_input_raises_clear_errors(rng):
    q, k, v = randn(rng, (2, 4, 5, 8), np.float32), randn(rng, (2, 4, 6, 8), np.float32), randn(rng, (2, 4, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"query's last dimension \(8\) differs from key's \(7\)"):
        sdpa(q, k[..., :7], v)
    with pytest.raises(ValueError, match=r"different lengths S: key \(2, 4, 6, 8\), value \(2, 4, 5, 3\)"):
        sdpa(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="do not broadcast"):
        sdpa(q, k[:1].repeat(3, 0), v)
    with pytest.raises(ValueError, match="query has 4 heads but key has 2; pass enable_gqa=True"):
        sdpa(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of the key/value heads \(3\)"):
        sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool .* got dtype int64"):
        sdpa(q, k, v, attn_mask=np.ones((5, 6), int))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 7\) does not broadcast to .* \(2, 4, 5, 6\)"):
        sdpa(q, k, v, attn_mask=np.ones((5, 7), bool))
    with pytest.raises(TypeError, match="share a dtype, got float32, float64 and float32"):
        sdpa(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match="float16"):
        sdpa(q.astype(np.float16), k, v)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        sdpa(q, k, v, dropout_p=0.1, rng=42)
    with pytest.raises(ValueError, match="causal_alignment must be"):
        sdpa(q, k, v, is_causal=True, causal_alignment="left")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sdpa(q[0, 0, 0], k, v)


# ---------------------------------------------------------------------------
# PyTorch, the second oracle

@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa", "scale",
                                  "decode", "ev_differs"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_pytorch(simd, case, dtype, rng):
    torch = torch_or_skip()
    F = torch.nn.functional
    B, H, Hkv, L, S, E, Ev = 2, 4, 4, 70, 150, 32, 32
    kwargs, tkwargs = {}, {}
    if case == "gqa":
        Hkv = 2
        kwargs["enable_gqa"] = tkwargs["enable_gqa"] = True
    if case == "decode":
        L, S = 1, 3000
    if case == "ev_differs":
        Ev = 20
    q, k, v = randn(rng, (B, H, L, E), dtype), randn(rng, (B, Hkv, S, E), dtype), randn(rng, (B, Hkv, S, Ev), dtype)
    if case == "causal":
        kwargs["is_causal"] = tkwargs["is_causal"] = True
    if case in ("bool_mask", "float_mask"):
        mask = rng.random((B, 1, L, S)) < 0.8
        mask[..., 0] = True  # PyTorch gives NaN for rows with nothing to attend to; attnkit 0
        if case == "float_mask":
            mask = np.where(mask, rng.standard_normal(mask.shape), -np.inf).astype(dtype)
        kwargs["attn_mask"] = mask
        tkwargs["attn_mask"] = torch.from_numpy(mask)
    if case == "scale":
        kwargs["scale"] = tkwargs["scale"] = 0.3
    expected = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k),
                                              torch.from_numpy(v), **tkwargs).numpy()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sdpa(q, k, v, **kwargs), expected, **tol)


def test_pytorch_and_attnkit_disagree_only_on_empty_rows(rng):
    torch = torch_or_skip()
    q, k, v = randn(rng, (3, 8), np.float32), randn(rng, (5, 8), np.float32), randn(rng, (5, 8), np.float32)
    mask = np.ones((3, 5), bool)
    mask[1] = False
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=torch.from_numpy(mask)).numpy()
    out = sdpa(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(out[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[1], 0)  # PyTorch: NaN
    assert_nonfinite_match(out[[0, 2]], expected[[0, 2]])


@pytest.mark.parametrize("L, S", [(70, 150), (1, 3000), (3, 2500)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_weights_averaged_over_heads(simd, L, S, dropout_p, rng):
    """return_weights="mean" gives the per-head weights' mean (what
    MultiheadAttention returns), dropout included, without the per-head array."""
    q, k, v = randn(rng, (2, 4, L, 16), np.float32), randn(rng, (2, 4, S, 16), np.float32), randn(rng, (2, 4, S, 16), np.float32)
    mask = rng.random((2, 1, L, S)) < 0.8
    kw = dict(attn_mask=mask, is_causal=True, causal_alignment="bottom_right", dropout_p=dropout_p)
    out, per_head = sdpa(q, k, v, return_weights=True, rng=np.random.default_rng(3), **kw)
    out2, mean = sdpa(q, k, v, return_weights="mean", rng=np.random.default_rng(3), **kw)
    np.testing.assert_array_equal(out2, out)
    assert mean.shape == (2, L, S)
    np.testing.assert_allclose(mean, per_head.mean(axis=1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="return_weights must be True, False or 'mean'"):
        sdpa(q, k, v, return_weights="sum")
