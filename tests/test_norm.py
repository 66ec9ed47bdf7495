"""layer_norm and rms_norm against attnkit.reference (and PyTorch, if installed)."""
from fractions import Fraction

import numpy as np
import pytest

import attnkit
from attnkit import _kernels, reference
from accuracy import assert_accurate, torch_or_skip

DTYPES = [np.float32, np.float64]
ROW_LENGTHS = [1, 7, 16, 17, 31, 33, 129, 1000, 100000]


def check_layer_norm(x, shape, weight=None, bias=None, eps=1e-5, out=None, factor=4.0):
    x_before = x.copy()
    result = attnkit.layer_norm(x, shape, weight, bias, eps, out=out)
    assert_accurate(result, lambda dt: reference.layer_norm(x, shape, weight, bias, eps, dtype=dt),
                    x.dtype, factor)
    if out is None:
        np.testing.assert_array_equal(x, x_before)
    return result


def check_rms_norm(x, shape, weight=None, eps=None, out=None, factor=4.0):
    x_before = x.copy()
    result = attnkit.rms_norm(x, shape, weight, eps, out=out)
    eps_ = np.finfo(x.dtype).eps if eps is None else eps
    assert_accurate(result, lambda dt: reference.rms_norm(x, shape, weight, eps_, dtype=dt),
                    x.dtype, factor)
    if out is None:
        np.testing.assert_array_equal(x, x_before)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_layer_norm_row_lengths(simd, dtype, length, affine, rng):
    rows = 1 if length == 100000 else 6
    x = (rng.standard_normal((rows, length)) * 3 + 1).astype(dtype)
    w = rng.standard_normal(length).astype(dtype) if affine in ("weight", "both") else None
    b = rng.standard_normal(length).astype(dtype) if affine in ("bias", "both") else None
    check_layer_norm(x, length, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm_row_lengths(simd, dtype, length, with_weight, rng):
    rows = 1 if length == 100000 else 6
    x = (rng.standard_normal((rows, length)) * 3 + 1).astype(dtype)
    w = rng.standard_normal(length).astype(dtype) if with_weight else None
    check_rms_norm(x, length, w)
    check_rms_norm(x, (length,), w, eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, normalized", [
    ((2, 3, 4, 5), (4, 5)), ((2, 3, 4, 5), (3, 4, 5)), ((7,), 7), ((7,), (7,)),
    ((3, 5), ()), ((1, 1, 1), (1, 1)), ((4, 6), [6]),
])
def test_normalized_shapes(simd, dtype, shape, normalized, rng):
    x = rng.standard_normal(shape).astype(dtype)
    nshape = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    w = rng.standard_normal(nshape).astype(dtype)
    b = rng.standard_normal(nshape).astype(dtype)
    check_layer_norm(x, normalized, w, b)
    check_rms_norm(x, normalized, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_rows", "reversed", "column_slice", "unaligned"])
def test_non_contiguous_inputs(simd, dtype, view, rng):
    base = (rng.standard_normal((30, 40)) * 2).astype(dtype)
    x = {
        "transposed": base.T,
        "strided_rows": base[::3],
        "reversed": base[::-1, ::-1],
        "column_slice": base[:, 3:36],
        "unaligned": np.frombuffer(b"\0" + base.tobytes(), dtype=dtype, offset=1).reshape(base.shape),
    }[view]
    C = x.shape[-1]
    w = np.linspace(0.5, 1.5, C).astype(dtype)[::-1]  # a negative-stride weight too
    check_layer_norm(x, C, w, w[::-1].copy())
    check_rms_norm(x, C, w)


def test_read_only_and_empty(rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    x.flags.writeable = False
    check_layer_norm(x, 9)
    check_rms_norm(x, 9)
    for shape, nshape in [((0, 5), 5), ((5, 0), 0), ((2, 0, 3), (0, 3)), ((0,), 0)]:
        e = np.zeros(shape, np.float64)
        assert attnkit.layer_norm(e, nshape).shape == shape
        assert attnkit.rms_norm(e, nshape).shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliasing_input(simd, dtype, rng):
    x = (rng.standard_normal((9, 37)) * 3).astype(dtype)
    w = rng.standard_normal(37).astype(dtype)
    for fn in (lambda a, out=None: attnkit.layer_norm(a, 37, w, w, out=out),
               lambda a, out=None: attnkit.rms_norm(a, 37, w, out=out)):
        expected = fn(x)
        y = x.copy()
        assert fn(y, out=y) is y
        np.testing.assert_array_equal(y, expected)
        buf = np.concatenate([x.ravel(), np.zeros(37, dtype)])
        shifted = buf[37:].reshape(9, 37)  # overlaps the input shifted by a row
        assert fn(buf[:-37].reshape(9, 37), out=shifted) is shifted
        np.testing.assert_array_equal(shifted, expected)
        out_t = np.empty((37, 9), dtype).T
        assert fn(x, out=out_t) is out_t
        np.testing.assert_array_equal(out_t, expected)


# ---------------------------------------------------------------------------
# Accuracy where a naive computation loses it

def exact_layer_norm(x, eps):
    """Layer norm of each row of x, with the mean and variance in exact
    rational arithmetic; only the final square root and scaling round. Even a
    long-double mean of 768 values near 1e4 is off by ~1e-15, too coarse to
    judge a float64 kernel on such rows, so this is the oracle there."""
    rows = []
    for row in x:
        values = [Fraction(float(v)) for v in row]
        mean = sum(values) / len(values)
        deviations = [v - mean for v in values]
        var = sum(d * d for d in deviations) / len(values)
        rstd = 1 / np.sqrt(np.longdouble(float(var)) + np.longdouble(eps))
        rows.append([np.longdouble(float(d)) * rstd for d in deviations])
    return np.array(rows, dtype=np.longdouble)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean, noise", [(1e4, 1e-2), (1e4, 1.0), (-3e5, 0.5), (1e6, 1e-3)])
def test_large_mean_small_noise(simd, dtype, mean, noise, rng):
    """No catastrophic cancellation: E[x^2] - E[x]^2 would lose every digit
    here, and even x - mean loses digits unless the mean is held in more than
    one float."""
    x = (mean + noise * rng.standard_normal((4, 768))).astype(dtype)
    result = attnkit.layer_norm(x, 768)
    expected = exact_layer_norm(x, 1e-5)
    err = np.max(np.abs(result - expected))
    assert err <= 8 * np.finfo(dtype).eps * np.max(np.abs(expected)), err
    if dtype == np.float32:
        assert_accurate(result, lambda dt: reference.layer_norm(x, 768, dtype=dt), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_rows(simd, dtype):
    big = np.finfo(dtype).max
    tiny = np.finfo(dtype).smallest_subnormal
    rows = np.array([
        [1.0, -1.0, 1.0, -1.0] * 9,                       # ordinary
        [big / 2, -big / 2, big / 4, 0.0] * 9,            # squares overflow the dtype
        [1e-30, -1e-30, 3e-30, 0.0] * 9,                  # squares underflow it
        [tiny, 0.0, -tiny, tiny] * 9,                     # subnormals
        [5.0] * 36,                                       # constant
        [0.0] * 36,                                       # zero
    ], dtype=dtype)
    for eps in (1e-5, 0.0, 1e-300):
        ln = attnkit.layer_norm(rows, 36, eps=eps)
        rn = attnkit.rms_norm(rows, 36, eps=eps)
        ln_ref = reference.layer_norm(rows, 36, eps=eps, dtype=np.longdouble)
        rn_ref = reference.rms_norm(rows, 36, eps=eps, dtype=np.longdouble)
        tol = 8 * np.finfo(dtype).eps
        finite = np.isfinite(ln_ref).all(-1)
        np.testing.assert_allclose(ln[finite], ln_ref[finite].astype(dtype), rtol=tol, atol=tol)
        finite = np.isfinite(rn_ref).all(-1)
        np.testing.assert_allclose(rn[finite], rn_ref[finite].astype(dtype), rtol=tol, atol=tol)
        if eps == 0.0:  # a constant row with no eps is 0/0, as in PyTorch
            assert np.isnan(ln[4]).all() and np.isnan(ln[5]).all() and np.isnan(rn[5]).all()
        else:
            np.testing.assert_array_equal(ln[4:], 0)
        # layer norm is scale-invariant when eps is negligible: the huge row
        # normalises exactly as the same pattern of small numbers does
        pattern = attnkit.layer_norm(np.array([2.0, -2.0, 1.0, 0.0] * 9, dtype), 36, eps=0.0)
        np.testing.assert_allclose(ln[1], pattern, rtol=tol, atol=tol)
        assert np.isfinite(ln[:4]).all() and np.isfinite(rn[:5]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows(simd, dtype):
    x = np.ones((4, 40), dtype) * np.arange(40, dtype=dtype)
    x[1, 7] = np.nan
    x[2, 3] = np.inf
    ln = attnkit.layer_norm(x, 40)
    rn = attnkit.rms_norm(x, 40)
    assert np.isnan(ln[1]).all() and np.isnan(ln[2]).all()
    assert np.isfinite(ln[[0, 3]]).all()
    assert np.isnan(rn[1]).all() and np.isfinite(rn[[0, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_statistics(simd, dtype, rng):
    """The kernel's mean and rstd outputs (for backward) match the reference."""
    x = (rng.standard_normal((5, 300)) * 2 + 7).astype(dtype)
    out, mean, rstd = np.empty_like(x), np.empty(5, dtype), np.empty(5, dtype)
    _kernels.layer_norm(out, mean, rstd, x, None, None, 1e-5)
    xl = x.astype(np.longdouble)
    np.testing.assert_allclose(mean, xl.mean(-1), rtol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xl.var(-1) + 1e-5), rtol=4 * np.finfo(dtype).eps)
    rrms = np.empty(5, dtype)
    _kernels.rms_norm(out, rrms, x, None, 1e-6)
    np.testing.assert_allclose(rrms, 1 / np.sqrt((xl * xl).mean(-1) + 1e-6), rtol=4 * np.finfo(dtype).eps)


def test_worked_example_on_a_three_vector():
    """TOPICS #20: layer norm of [1, 2, 3] by hand: mean 2, var 2/3, so
    (x - 2) / sqrt(2/3 + eps) = [-1.2247, 0, 1.2247]."""
    x = np.array([1.0, 2.0, 3.0])
    expected = (x - 2) / np.sqrt(2 / 3 + 1e-5)
    np.testing.assert_allclose(attnkit.layer_norm(x, 3), expected, rtol=1e-15)
    np.testing.assert_allclose(reference.layer_norm(x, 3), expected, rtol=1e-15)
    np.testing.assert_allclose(attnkit.layer_norm(x, 3), [-1.2247357, 0.0, 1.2247357], rtol=1e-7)


# ---------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("bad, fragment", [
    (np.arange(6).reshape(2, 3), "int64"), (np.ones((2, 3), bool), "bool"),
    (np.ones((2, 3), np.float16), "float16"), (np.ones((2, 3), complex), "complex128"),
    (np.ones((2, 3), object), "object"), (np.ones((2, 3), ">f4"), "byte order"),
])
def test_bad_dtypes(bad, fragment):
    for fn in (attnkit.layer_norm, attnkit.rms_norm):
        with pytest.raises(TypeError, match=fragment):
            fn(bad, 3)


def test_bad_shapes_and_parameters():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"normalized_shape \(5,\) does not match .* \(4, 6\)"):
        attnkit.layer_norm(x, 5)
    with pytest.raises(ValueError, match=r"normalized_shape \(3, 4, 6\) does not match"):
        attnkit.rms_norm(x, (3, 4, 6))
    with pytest.raises(ValueError, match="negative"):
        attnkit.layer_norm(x, (-6,))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a tuple of ints"):
        attnkit.layer_norm(x, "6")
    with pytest.raises(ValueError, match=r"weight has shape \(5,\) but normalized_shape is \(6,\)"):
        attnkit.layer_norm(x, 6, np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"bias has shape \(1, 6\) but normalized_shape is \(6,\)"):
        attnkit.layer_norm(x, 6, None, np.ones((1, 6), np.float32))
    with pytest.raises(TypeError, match="weight has dtype float64 but the input is float32"):
        attnkit.rms_norm(x, 6, np.ones(6))
    for eps in (-1e-5, np.nan, np.inf):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            attnkit.layer_norm(x, 6, eps=eps)
    with pytest.raises(TypeError, match="eps must be a real number"):
        attnkit.rms_norm(x, 6, eps="small")
    with pytest.raises(ValueError, match=r"out has shape \(6, 4\)"):
        attnkit.layer_norm(x, 6, out=np.empty((6, 4), np.float32))


def test_binding_refuses_what_would_be_unsafe():
    """The binding re-checks what memory safety rests on, whoever calls it."""
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="rows .* are not contiguous"):
        _kernels.layer_norm(np.empty((4, 6), np.float32), None, None,
                            np.ones((4, 12), np.float32)[:, ::2], None, None, 1e-5)
    with pytest.raises(ValueError, match="shape"):
        _kernels.layer_norm(np.empty((4, 5), np.float32), None, None, x, None, None, 1e-5)
    with pytest.raises(TypeError, match="float32"):
        _kernels.layer_norm(np.empty((4, 6)), None, None, x, None, None, 1e-5)
    with pytest.raises(ValueError, match="contiguous vector of 6"):
        _kernels.layer_norm(np.empty((4, 6), np.float32), None, None, x, np.ones(5, np.float32),
                            None, 1e-5)
    with pytest.raises(ValueError, match="contiguous vector of 4"):
        _kernels.rms_norm(np.empty((4, 6), np.float32), np.ones(3, np.float32), x, None, 1e-5)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty((4, 6), np.float32)
        ro.flags.writeable = False
        _kernels.rms_norm(ro, None, x, None, 1e-5)
    x3 = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="inner axis must be contiguous"):
        _kernels.softmax(np.empty((2, 3, 8), np.float32)[:, :, ::2], x3, None, False)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        _kernels.softmax(np.empty((2, 3, 1), np.float32), np.ones((2, 6, 1), np.float32)[:, ::2],
                         None, False)
    with pytest.raises(TypeError, match="bool"):
        _kernels.softmax(np.empty_like(x3), x3, np.ones((2, 3, 4), np.uint8), False)
    with pytest.raises(ValueError, match="where shape"):
        _kernels.softmax(np.empty_like(x3), x3, np.ones((2, 3, 5), bool), False)
    assert _kernels.softmax_last_axis(x3.astype(np.int32), False) is None
    assert _kernels.softmax_last_axis([1.0], False) is None


# ---------------------------------------------------------------------------
# PyTorch, the second oracle

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, nshape", [((8, 768), (768,)), ((3, 5, 7), (5, 7)), ((2, 1), (1,))])
def test_matches_pytorch(simd, dtype, shape, nshape, rng):
    torch = torch_or_skip()
    F = torch.nn.functional
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = rng.standard_normal(nshape).astype(dtype)
    b = rng.standard_normal(nshape).astype(dtype)
    t = torch.from_numpy
    tol = dict(rtol=1.3e-6, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(attnkit.layer_norm(x, nshape, w, b),
                               F.layer_norm(t(x), nshape, t(w), t(b)).numpy(), **tol)
    np.testing.assert_allclose(attnkit.rms_norm(x, nshape, w),
                               F.rms_norm(t(x), nshape, t(w)).numpy(), **tol)
    np.testing.assert_allclose(attnkit.rms_norm(x, nshape, w, eps=1e-6),
                               F.rms_norm(t(x), nshape, t(w), eps=1e-6).numpy(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 3, 7, 33, 1000])
def test_constant_rows_normalise_to_exactly_the_bias(simd, dtype, length):
    x = np.full((3, length), 2.161022, dtype)
    x[1] = -7.3e5
    bias = np.linspace(-1, 1, length).astype(dtype)
    np.testing.assert_array_equal(attnkit.layer_norm(x, length), 0)
    np.testing.assert_array_equal(attnkit.layer_norm(x, length, None, bias), np.broadcast_to(bias, x.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_outputs_written_past_the_caches(simd, dtype, rng):
    """An output over 16 MB is written with streaming stores, aligned vectors
    only; rows of odd length start at every alignment, so the plain head and
    tail of each row are exercised too. Small calls do not stream, so the same
    rows in small pieces must give bitwise the same result."""
    C = 1001
    N = (17 << 20) // (C * np.dtype(dtype).itemsize) + 1
    x = (rng.standard_normal((N, C)) * 2 + 3).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    pieces = range(0, N, 997)
    ln = attnkit.layer_norm(x, C, w, b)
    rn = attnkit.rms_norm(x, C, w)
    out = np.empty(N * C + 1, dtype)[1:].reshape(N, C)  # no row 32-byte aligned at its start
    assert attnkit.layer_norm(x, C, w, b, out=out) is out
    for i in pieces:
        expected = attnkit.layer_norm(x[i:i + 997], C, w, b)
        np.testing.assert_array_equal(ln[i:i + 997], expected)
        np.testing.assert_array_equal(out[i:i + 997], expected)
        np.testing.assert_array_equal(rn[i:i + 997], attnkit.rms_norm(x[i:i + 997], C, w))
    assert_accurate(ln[:50], lambda dt: reference.layer_norm(x[:50], C, w, b, dtype=dt), dtype)
