"""softmax_backward and log_softmax_backward (csrc/softmax.c's backward)
against attnkit.reference on every SIMD path, float64 central differences,
PyTorch's autograd, where= masks (fully masked slices included), axes other
than the last, non-contiguous inputs, thread counts, and bad input."""
import numpy as np
import pytest

import attnkit
from attnkit import reference
from accuracy import assert_accurate, torch_or_skip
from threads import thread_count

FUNCS = {"softmax": (attnkit.softmax, attnkit.softmax_backward, reference.softmax_backward),
         "log_softmax": (attnkit.log_softmax, attnkit.log_softmax_backward,
                         reference.log_softmax_backward)}
DTYPES = [np.float32, np.float64]
ROW_LENGTHS = [1, 7, 59, 113, 257, 1023, 100000]


def operands(func, shape, dtype, rng, axis=-1, where=None):
    """y = the forward's output for random logits, and a random upstream grad."""
    forward = FUNCS[func][0]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = forward(x, axis=axis, where=where)
    grad = rng.standard_normal(shape).astype(dtype)
    return grad, y


def check(func, grad, y, axis=-1, where=None, out=None, factor=4.0):
    """Run the kernel, hold it to the accuracy rule, check nothing was modified."""
    _, backward, ref = FUNCS[func]
    before = [grad.copy(), y.copy()]
    result = backward(grad, y, axis=axis, where=where, out=out)
    assert_accurate(result, lambda dt: ref(grad, y, axis=axis, where=where, dtype=dt), y.dtype, factor)
    if out is None:
        np.testing.assert_array_equal(grad, before[0])
        np.testing.assert_array_equal(y, before[1])
    return result


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
def test_row_lengths(simd, func, dtype, length, rng):
    rows = 1 if length == 100000 else 5
    grad, y = operands(func, (rows, length), dtype, rng)
    dx = check(func, grad, y)
    assert dx.shape == y.shape and dx.dtype == y.dtype
    if func == "softmax":   # the gradient of a softmax sums to 0 along the slice
        assert np.all(np.abs(dx.sum(-1)) <= 64 * np.finfo(dtype).eps * np.abs(grad).max())


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [
    ((3, 5, 7), 0), ((3, 5, 7), 1), ((3, 5, 7), -2), ((4, 33, 9), 1), ((2, 17, 16), 1),
    ((1, 129, 31), 1), ((6, 1023), 0), ((59, 113), 0), ((2, 3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (0, 2)), ((2, 3, 4, 5), None), ((2, 3), ()),
])
def test_axes(simd, func, dtype, shape, axis, rng):
    grad, y = operands(func, shape, dtype, rng, axis=axis)
    dx = check(func, grad, y, axis=axis)
    assert dx.flags.c_contiguous


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, where_shape", [
    ((6, 59), -1, (6, 59)), ((6, 257), -1, (1, 257)), ((4, 33, 9), 1, (4, 33, 9)),
    ((4, 33, 9), 1, (33, 1)), ((3, 1023), -1, (3, 1)),
])
def test_where_masks(simd, func, dtype, shape, axis, where_shape, rng):
    where = rng.random(where_shape) < 0.7
    # a slice with nothing kept: its gradient is 0, not NaN
    where[(0,) * (len(where_shape) - 1)] = False
    grad, y = operands(func, shape, dtype, rng, axis=axis, where=where)
    grad[np.broadcast_to(~where, shape)] = np.nan   # masked-out grads never leak
    dx = check(func, grad, y, axis=axis, where=where)
    assert not np.isnan(dx).any()
    assert np.all(dx[np.broadcast_to(~where, shape)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_of_minus_infinity_get_zero(simd, dtype, rng):
    x = rng.standard_normal((4, 37)).astype(dtype)
    x[1] = -np.inf                 # the forward's empty slice
    x[2, ::3] = -np.inf            # a slice with some -inf: their gradient is grad (log_softmax)
    grad = rng.standard_normal(x.shape).astype(dtype)
    for func in FUNCS:
        forward = FUNCS[func][0]
        dx = check(func, grad, forward(x))
        assert np.all(dx[1] == 0)
        if func == "log_softmax":
            np.testing.assert_array_equal(dx[2, ::3], grad[2, ::3])
        else:
            assert np.all(dx[2, ::3] == 0)
    # y's columns along axis 0, the column path, with an empty slice too
    xt = np.ascontiguousarray(x.T)
    for func in FUNCS:
        dx = check(func, grad.T.copy(), FUNCS[func][0](xt, axis=0), axis=0)
        assert np.all(dx[:, 1] == 0)


@pytest.mark.parametrize("func", FUNCS)
def test_nan_propagates(func, rng):
    grad, y = operands(func, (3, 40), np.float32, rng)
    grad[1, 5] = np.nan
    dx = FUNCS[func][1](grad, y)
    assert np.isnan(dx[1]).all() and not np.isnan(dx[[0, 2]]).any()


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_rows", "reversed", "column_slice"])
def test_non_contiguous_inputs(simd, func, dtype, view, rng):
    big_grad = rng.standard_normal((40, 66)).astype(dtype)
    big_x = (rng.standard_normal((40, 66)) * 3).astype(dtype)
    pick = {"transposed": lambda a: a.T, "strided_rows": lambda a: a[::3],
            "reversed": lambda a: a[::-1, ::-1], "column_slice": lambda a: a[:, 5:50:2]}[view]
    grad, x = pick(big_grad), pick(big_x)
    y = FUNCS[func][0](x)
    y_view = pick(np.array(np.zeros_like(big_x)))
    y_view[...] = y
    dx = check(func, grad, y_view)
    np.testing.assert_array_equal(dx, FUNCS[func][1](np.ascontiguousarray(grad), y))


@pytest.mark.parametrize("func", FUNCS)
def test_out(func, rng):
    grad, y = operands(func, (5, 33), np.float64, rng)
    backward = FUNCS[func][1]
    expected = backward(grad, y)
    out = np.empty_like(y)
    assert backward(grad, y, out=out) is out
    np.testing.assert_array_equal(out, expected)
    g2 = grad.copy()
    assert backward(g2, y, out=g2) is g2                 # in place over grad
    np.testing.assert_array_equal(g2, expected)
    y2 = y.copy()
    assert backward(grad, y2, out=y2) is y2              # in place over y
    np.testing.assert_array_equal(y2, expected)
    strided = np.empty((5, 66))[:, ::2]
    backward(grad, y, out=strided)
    np.testing.assert_array_equal(strided, expected)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("axis, masked", [(-1, False), (-1, True), (0, True)])
def test_finite_differences(func, axis, masked, rng):
    """dx against float64 central differences of L(x) = sum(grad * f(x))."""
    forward, backward, _ = FUNCS[func]
    x = rng.standard_normal((4, 9))
    where = rng.random((4, 9)) < 0.75 if masked else None
    grad = rng.standard_normal(x.shape)
    if where is not None:
        grad = np.where(where, grad, 0)      # the loss cannot depend on a masked -inf output

    def loss(z):
        out = forward(z, axis=axis, where=where)
        return float(np.sum(grad * np.where(np.isfinite(out), out, 0)))

    dx = backward(grad, forward(x, axis=axis, where=where), axis=axis, where=where)
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        numeric[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((8, 1023), -1), ((3, 59, 7), 1), ((2, 113), 0)])
def test_matches_pytorch(func, dtype, shape, axis, rng):
    torch = torch_or_skip()
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = (torch.softmax if func == "softmax" else torch.log_softmax)(tx, dim=axis)
    ty.backward(torch.tensor(grad))
    dx = FUNCS[func][1](grad, FUNCS[func][0](x, axis=axis), axis=axis)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("shape, axis", [((600, 1023), -1), ((60, 257, 40), 1)])
def test_same_bits_on_any_thread_count(func, shape, axis, rng):
    where = rng.random(shape[-1]) < 0.9 if axis == -1 else None
    grad, y = operands(func, shape, np.float32, rng, axis=axis, where=where)
    results = []
    for n in (1, 2, 3):
        with thread_count(n):
            results.append(FUNCS[func][1](grad, y, axis=axis, where=where))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_empty_and_scalar():
    assert attnkit.softmax_backward(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0, 3)
    assert attnkit.log_softmax_backward(np.zeros((3, 0), np.float32),
                                        np.zeros((3, 0), np.float32)).dtype == np.float32
    assert attnkit.softmax_backward(np.float64(2.0), np.float64(1.0), axis=None) == 0.0


def test_bad_input():
    y = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"grad has shape \(3, 5\) but the output y has shape \(3, 4\)"):
        attnkit.softmax_backward(np.zeros((3, 5)), y)
    with pytest.raises(TypeError, match="grad has dtype float32 but the output y is float64"):
        attnkit.softmax_backward(np.zeros((3, 4), np.float32), y)
    with pytest.raises(TypeError, match="int64"):
        attnkit.log_softmax_backward(np.zeros((3, 4), np.int64), np.zeros((3, 4), np.int64))
    with pytest.raises(np.exceptions.AxisError):
        attnkit.softmax_backward(y, y, axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        attnkit.softmax_backward(y, y, axis="1")
    with pytest.raises(TypeError, match="where must be a bool array"):
        attnkit.softmax_backward(y, y, where=np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"where of shape \(2,\) does not broadcast"):
        attnkit.log_softmax_backward(y, y, where=np.ones(2, bool))
    with pytest.raises(ValueError, match=r"out has shape \(4, 3\)"):
        attnkit.softmax_backward(y, y, out=np.empty((4, 3)))
    with pytest.raises(TypeError, match="out has dtype float32"):
        attnkit.softmax_backward(y, y, out=np.empty((3, 4), np.float32))
