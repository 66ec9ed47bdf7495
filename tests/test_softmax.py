"""softmax and log_softmax against attnkit.reference (and PyTorch, if installed)."""
import numpy as np
import pytest

import attnkit
from attnkit import reference
from accuracy import assert_accurate, assert_nonfinite_match, torch_or_skip

FUNCS = {"softmax": (attnkit.softmax, reference.softmax),
         "log_softmax": (attnkit.log_softmax, reference.log_softmax)}
DTYPES = [np.float32, np.float64]
ROW_LENGTHS = [1, 7, 16, 17, 31, 33, 129, 1000, 100000]


def check(func_name, x, axis=-1, where=None, out=None, factor=4.0):
    """Run the kernel and hold it to the accuracy rule; return its result."""
    kernel, ref = FUNCS[func_name]
    x_before = x.copy()
    where_before = None if where is None else np.array(where, copy=True)
    result = kernel(x, axis=axis, where=where, out=out)
    assert_accurate(result, lambda dt: ref(x, axis=axis, where=where, dtype=dt), x.dtype, factor)
    if out is None or not np.shares_memory(out, x):
        np.testing.assert_array_equal(x, x_before)  # the input is never modified
    if where is not None:
        np.testing.assert_array_equal(where, where_before)
    return result


# ---------------------------------------------------------------------------
# Sweeps

@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
def test_row_lengths(simd, func, dtype, length, rng):
    rows = 1 if length == 100000 else 5
    x = (rng.standard_normal((rows, length)) * 4).astype(dtype)
    result = check(func, x)
    if func == "softmax":
        np.testing.assert_allclose(result.sum(-1), 1, rtol=10 * np.finfo(dtype).eps * np.sqrt(length))


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [
    ((3, 5, 7), 0), ((3, 5, 7), 1), ((3, 5, 7), 2), ((3, 5, 7), -2),
    ((4, 33, 9), 1), ((2, 17, 8), 1), ((2, 17, 16), 1), ((1, 129, 31), 1),
    ((6, 1000), 0), ((100000, 3), 0), ((2, 3, 4, 5), (1, 2)), ((2, 3, 4, 5), (0, 2)),
    ((2, 3, 4, 5), (-1, 0)), ((2, 3, 4, 5), None), ((7,), None), ((2, 3), ()),
])
def test_axes(simd, func, dtype, shape, axis, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    result = check(func, x, axis=axis)
    assert result.flags.c_contiguous


def test_scalar_input_axis_none():
    assert attnkit.softmax(np.float64(3.0), axis=None) == 1.0
    assert attnkit.log_softmax(np.float32(3.0), axis=None) == 0.0


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_rows", "strided_cols", "reversed",
                                  "reversed_rows", "fortran", "column_slice", "unaligned"])
def test_non_contiguous_inputs(simd, func, dtype, view, rng):
    base = (rng.standard_normal((40, 66)) * 3).astype(dtype)
    x = {
        "transposed": base.T,
        "strided_rows": base[::3],
        "strided_cols": base[:, ::2],
        "reversed": base[::-1, ::-1],
        "reversed_rows": base[::-2],
        "fortran": np.asfortranarray(base),
        "column_slice": base[:, 5:38],
        "unaligned": np.frombuffer(b"\0" + base.tobytes(), dtype=dtype, offset=1).reshape(base.shape),
    }[view]
    for axis in (-1, 0):
        check(func, x, axis=axis)


@pytest.mark.parametrize("func", FUNCS)
def test_read_only_input(func, rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    x.flags.writeable = False
    check(func, x)
    check(func, x, axis=0, where=np.ones(9, bool))


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("shape, axis", [((0, 5), -1), ((5, 0), -1), ((5, 0), 0), ((0,), 0),
                                         ((2, 0, 3), 1), ((2, 0, 3), None)])
def test_empty(func, shape, axis):
    kernel, _ = FUNCS[func]
    for dtype in DTYPES:
        x = np.zeros(shape, dtype)
        result = kernel(x, axis=axis)
        assert result.shape == shape and result.dtype == dtype
        out = np.empty(shape, dtype)
        assert kernel(x, axis=axis, out=out) is out


# ---------------------------------------------------------------------------
# out=

@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_out_aliasing_input(simd, func, dtype, axis, rng):
    kernel, ref = FUNCS[func]
    x = (rng.standard_normal((9, 37)) * 3).astype(dtype)
    expected = kernel(x.copy(), axis=axis)
    y = x.copy()
    assert kernel(y, axis=axis, out=y) is y
    np.testing.assert_array_equal(y, expected)
    # in place on a non-contiguous view
    z = np.zeros((9, 74), dtype)
    z[:, ::2] = x
    view = z[:, ::2]
    kernel(view, axis=axis, out=view)
    np.testing.assert_array_equal(view, expected)
    np.testing.assert_array_equal(z[:, 1::2], 0)


@pytest.mark.parametrize("func", FUNCS)
def test_out_partially_overlapping_input(simd, func, rng):
    kernel, _ = FUNCS[func]
    buf = rng.standard_normal(200).astype(np.float32)
    x = buf[:150].reshape(10, 15)
    expected = kernel(x.copy())
    out = buf[15:165].reshape(10, 15)  # shifted by one row
    assert kernel(x, out=out) is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("func", FUNCS)
def test_out_non_contiguous_and_other_layouts(simd, func, rng):
    kernel, _ = FUNCS[func]
    x = rng.standard_normal((6, 20)).astype(np.float64)
    expected = kernel(x)
    for out in (np.empty((20, 6)).T, np.empty((6, 40))[:, ::2], np.empty((6, 20), order="F")):
        assert kernel(x, out=out) is out
        np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------
# where=

@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where_shape", ["full", "row", "column", "scalar", "strided", "3d"])
def test_where_broadcasts(simd, func, dtype, where_shape, rng):
    x = (rng.standard_normal((6, 5, 37)) * 3).astype(dtype)
    where = {
        "full": rng.random(x.shape) < 0.7,
        "row": rng.random(37) < 0.5,
        "column": rng.random((5, 1)) < 0.5,
        "scalar": np.array(True),
        "strided": (rng.random((6, 5, 74)) < 0.6)[:, :, ::2],
        "3d": rng.random((6, 1, 37)) < 0.6,
    }[where_shape]
    for axis in (-1, 1, 0, None, (0, 2)):
        check(func, x, axis=axis, where=where)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zero_and_minus_inf(simd, dtype, rng):
    x = rng.standard_normal((4, 50)).astype(dtype)
    where = np.ones_like(x, dtype=bool)
    where[1] = False
    where[3, :49] = False
    p = attnkit.softmax(x, where=where)
    lp = attnkit.log_softmax(x, where=where)
    np.testing.assert_array_equal(p[1], 0)
    np.testing.assert_array_equal(lp[1], -np.inf)
    np.testing.assert_array_equal(p[3, :49], 0)
    assert p[3, 49] == 1 and lp[3, 49] == 0
    np.testing.assert_array_equal(lp[~where], -np.inf)
    np.testing.assert_array_equal(p[~where], 0)
    # masked-out NaN does not leak; an unmasked NaN does
    x[1, 3] = np.nan
    assert not np.isnan(attnkit.softmax(x, where=where)).any()
    where[1, 3] = True
    assert np.isnan(attnkit.softmax(x, where=where)[1]).all()


# ---------------------------------------------------------------------------
# Extreme values

@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_extreme_values(simd, func, dtype, axis):
    big = np.finfo(dtype).max
    rows = [
        [1e30, -1e30, 0.0, 1e30, 5.0, -3.0, 2.0],          # huge logits, a tie at the top
        [big, -big, big * 0.5, 0.0, -1.0, big, 1.0],        # near the dtype's maximum
        [-np.inf] * 7,                                      # nothing to attend to
        [3.25] * 7,                                         # all equal
        [-np.inf, 1.0, -np.inf, 2.0, -np.inf, 3.0, -np.inf],
        [0.0, 1.0, np.nan, 2.0, 3.0, 4.0, 5.0],             # NaN: this row only
        [1e-40, -1e-40, 0.0, 5e-324, 0.0, 1.0, -1.0],       # subnormals
        [-200.0, -110.0, -104.5, -90.0, -87.0, 0.0, -745.0],  # exp deep in the subnormals
        [np.inf, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],             # +inf: NaN, as PyTorch
    ]
    with np.errstate(over="ignore"):
        x = np.array(rows, dtype=dtype)
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    result = check(func, x, axis=axis)
    r = result if axis == -1 else result.T
    kernel, _ = FUNCS[func]
    if func == "softmax":
        for i in (0, 1, 3, 4, 6, 7):
            assert np.isfinite(r[i]).all()
            np.testing.assert_allclose(r[i].sum(), 1, rtol=4 * np.finfo(dtype).eps)
        np.testing.assert_array_equal(r[2], 0)
        np.testing.assert_array_equal(r[3], np.full(7, 1 / 7, dtype))
        assert r[0][0] == r[0][3] == dtype(0.5)
    else:
        np.testing.assert_array_equal(r[2], -np.inf)
        assert np.isfinite(r[3]).all()
    assert np.isnan(r[5]).all() and not np.isnan(np.delete(r, [5, 8], axis=0)).any()
    assert np.isnan(r[8]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_keeps_precision_where_softmax_underflows(dtype):
    x = np.array([0.0, -2000.0, -50000.0], dtype)
    lp = attnkit.log_softmax(x)
    np.testing.assert_allclose(lp, [0.0, -2000.0, -50000.0], rtol=1e-6)
    assert np.isfinite(lp).all()


def test_rows_are_independent(rng):
    """A row's result does not depend on its neighbours or on its position."""
    x = rng.standard_normal((50, 300)).astype(np.float32)
    full = attnkit.softmax(x)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(attnkit.softmax(x[i:i + 1]), full[i:i + 1])
        np.testing.assert_array_equal(attnkit.softmax(x[i]), full[i])


# ---------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("bad, fragment", [
    (np.arange(6).reshape(2, 3), "int64"),
    (np.ones((2, 3), bool), "bool"),
    (np.ones((2, 3), np.float16), "float16"),
    (np.ones((2, 3), np.complex128), "complex128"),
    (np.array([[1.0, "a"]], dtype=object), "object"),
    (np.ones((2, 3), ">f4"), "byte order"),
    (np.ones((2, 3), ">f8"), "byte order"),
    ([[1, 2], [3, 4]], "int64"),
    ("text", "<U4"),
])
def test_bad_dtypes_raise_type_error(func, bad, fragment):
    kernel, _ = FUNCS[func]
    with pytest.raises(TypeError, match=fragment) as info:
        kernel(bad)
    assert str(np.shape(bad)) in str(info.value)


@pytest.mark.parametrize("func", FUNCS)
def test_bad_axis(func):
    kernel, _ = FUNCS[func]
    x = np.ones((2, 3), np.float32)
    for axis in (2, -3):
        with pytest.raises(np.exceptions.AxisError, match="out of bounds"):
            kernel(x, axis=axis)
    with pytest.raises(ValueError, match="repeated axis"):
        kernel(x, axis=(0, 0))
    with pytest.raises(TypeError, match="axis must be an int"):
        kernel(x, axis=1.0)
    with pytest.raises(TypeError, match="axis must be an int"):
        kernel(x, axis=("a",))
    with pytest.raises(np.exceptions.AxisError):
        kernel(np.float32(1.0))  # axis=-1 on a 0-d array
    assert issubclass(np.exceptions.AxisError, ValueError)


@pytest.mark.parametrize("func", FUNCS)
def test_bad_where(func):
    kernel, _ = FUNCS[func]
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="where must be a bool array, got dtype int64"):
        kernel(x, where=np.ones((2, 3), int))
    with pytest.raises(ValueError, match=r"where of shape \(3, 2\) does not broadcast .* \(2, 3\)"):
        kernel(x, where=np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernel(x, where=np.ones((4, 2, 3), bool))  # where may not add dimensions


@pytest.mark.parametrize("func", FUNCS)
def test_bad_out(func):
    kernel, _ = FUNCS[func]
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="out has dtype float64 but the result is float32"):
        kernel(x, out=np.empty((2, 3)))
    with pytest.raises(ValueError, match=r"out has shape \(3, 2\) but the result has shape \(2, 3\)"):
        kernel(x, out=np.empty((3, 2), np.float32))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        kernel(x, out=[0.0] * 6)
    ro = np.empty((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernel(x, out=ro)


def test_inputs_unchanged_after_errors():
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    where = np.ones((3, 4), bool)
    out = np.full((4, 3), 7.0)
    before = (x.copy(), where.copy(), out.copy())
    with pytest.raises(ValueError):
        attnkit.softmax(x, where=where, out=out)
    for a, b in zip((x, where, out), before):
        np.testing.assert_array_equal(a, b)


def test_array_likes_and_subclasses():
    np.testing.assert_allclose(attnkit.softmax([1.0, 2.0, 3.0]), reference.softmax([1.0, 2.0, 3.0]))
    m = np.ma.masked_array(np.array([[1.0, 2.0], [3.0, 5.0]]))
    r = attnkit.softmax(m)
    np.testing.assert_allclose(r, reference.softmax(m.data))


# ---------------------------------------------------------------------------
# PyTorch, the second oracle

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((5, 1000), -1), ((3, 17, 9), 1), ((64, 7), 0)])
def test_matches_pytorch(simd, dtype, shape, axis, rng):
    torch = torch_or_skip()
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    t = torch.from_numpy(x)
    tol = dict(rtol=1.3e-6, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(attnkit.softmax(x, axis=axis), torch.softmax(t, axis).numpy(), **tol)
    np.testing.assert_allclose(attnkit.log_softmax(x, axis=axis),
                               torch.log_softmax(t, axis).numpy(), **tol)


def test_matches_pytorch_on_extremes():
    torch = torch_or_skip()
    x = np.array([[1e30, -1e30, 0.0], [3.0, 3.0, 3.0], [np.nan, 1.0, 2.0]], np.float32)
    expected = torch.softmax(torch.from_numpy(x), -1).numpy()
    assert_nonfinite_match(attnkit.softmax(x), expected)
    np.testing.assert_allclose(attnkit.softmax(x)[:2], expected[:2], rtol=1e-6)
