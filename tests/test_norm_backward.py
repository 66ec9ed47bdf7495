"""layer_norm_backward and rms_norm_backward (csrc/norm.c's backward), and
the forwards' return_stats=, against attnkit.reference on every SIMD path,
float64 central differences, PyTorch's autograd, rows with a large mean,
non-contiguous inputs, thread counts, accumulation at the binding, and bad
input."""
import numpy as np
import pytest

import attnkit
from attnkit import _kernels, reference
from accuracy import assert_accurate, torch_or_skip
from threads import thread_count

DTYPES = [np.float32, np.float64]
ROW_LENGTHS = [1, 7, 59, 113, 257, 1023, 32768]


def layer_operands(shape, nshape, dtype, rng, with_weight=True, offset=0.0, noise=1.0):
    x = (offset + noise * rng.standard_normal(shape)).astype(dtype)
    w = (1 + 0.3 * rng.standard_normal(nshape)).astype(dtype) if with_weight else None
    b = (0.1 * rng.standard_normal(nshape)).astype(dtype) if with_weight else None
    grad = rng.standard_normal(shape).astype(dtype)
    return x, w, b, grad


def check_layer(x, grad, nshape, w, b, dweight_ulps=16):
    before = [a.copy() for a in (x, grad) + (() if w is None else (w,))]
    _, mean, rstd = attnkit.layer_norm(x, nshape, w, b, return_stats=True)
    dx, dw, db = attnkit.layer_norm_backward(grad, x, mean, rstd, nshape, w)
    shape = nshape if isinstance(nshape, tuple) else (nshape,)
    assert dx.shape == x.shape and dw.shape == shape and db.shape == shape
    assert dx.dtype == dw.dtype == db.dtype == x.dtype

    def ref(i):
        return lambda dt: reference.layer_norm_backward(grad, x, mean, rstd, nshape, w, dtype=dt)[i]
    assert_accurate(dx, ref(0), x.dtype)
    # dweight and dbias sum over rows in blocks (colsum.h), NumPy pairwise: a
    # sum of either sign may round a few ulps of its result further off
    assert_accurate(dw, ref(1), x.dtype, ulps=dweight_ulps)
    assert_accurate(db, ref(2), x.dtype, ulps=dweight_ulps)
    for a, kept in zip((x, grad) + (() if w is None else (w,)), before):
        np.testing.assert_array_equal(a, kept)
    return dx, dw, db


def check_rms(x, grad, nshape, w):
    _, rstd = attnkit.rms_norm(x, nshape, w, return_stats=True)
    dx, dw = attnkit.rms_norm_backward(grad, x, rstd, nshape, w)
    assert dx.shape == x.shape and dw.shape == (nshape if isinstance(nshape, tuple) else (nshape,))

    def ref(i):
        return lambda dt: reference.rms_norm_backward(grad, x, rstd, nshape, w, dtype=dt)[i]
    assert_accurate(dx, ref(0), x.dtype)
    assert_accurate(dw, ref(1), x.dtype, ulps=16)
    return dx, dw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_layer_norm_row_lengths(simd, dtype, length, with_weight, rng):
    rows = 3 if length == 32768 else 37
    x, w, b, grad = layer_operands((rows, length), length, dtype, rng, with_weight)
    check_layer(x, grad, length, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm_row_lengths(simd, dtype, length, with_weight, rng):
    rows = 3 if length == 32768 else 37
    x, w, _, grad = layer_operands((rows, length), length, dtype, rng, with_weight)
    check_rms(x, grad, length, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, nshape", [((3, 5, 7), (5, 7)), ((2, 3, 4, 5), (3, 4, 5)),
                                            ((1000, 3), (3,)), ((4, 1), (1,)), ((6,), (6,))])
def test_normalized_shapes(simd, dtype, shape, nshape, rng):
    x, w, b, grad = layer_operands(shape, nshape, dtype, rng)
    check_layer(x, grad, nshape, w, b)
    check_rms(x, grad, nshape, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean, noise", [(1e4, 1.0), (1e4, 1e-2), (-3e5, 0.5)])
def test_rows_with_a_large_mean(simd, dtype, mean, noise, rng):
    x, w, b, grad = layer_operands((20, 259), 259, dtype, rng, True, mean, noise)
    check_layer(x, grad, 259, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_rows", "reversed", "column_slice"])
def test_non_contiguous_inputs(simd, dtype, view, rng):
    pick = {"transposed": lambda a: a.T, "strided_rows": lambda a: a[::3],
            "reversed": lambda a: a[::-1, ::-1], "column_slice": lambda a: a[:, 5:50]}[view]
    big_x = rng.standard_normal((60, 66)).astype(dtype)
    big_grad = rng.standard_normal((60, 66)).astype(dtype)
    x, grad = pick(big_x), pick(big_grad)
    C = x.shape[-1]
    w = (1 + 0.3 * rng.standard_normal(C)).astype(dtype)
    dx, dw, db = check_layer(x, grad, C, w, None)
    _, mean, rstd = attnkit.layer_norm(x, C, w, return_stats=True)
    contiguous = attnkit.layer_norm_backward(np.ascontiguousarray(grad), np.ascontiguousarray(x),
                                             mean, rstd, C, w)
    for a, b in zip((dx, dw, db), contiguous):
        np.testing.assert_array_equal(a, b)
    # statistics given as non-contiguous views, or without the trailing 1s
    again = attnkit.layer_norm_backward(grad, x, mean.reshape(-1)[::-1][::-1], rstd[:, 0], C, w)
    np.testing.assert_array_equal(again[0], dx)
    check_rms(x, grad, C, w)


def test_finite_differences(rng):
    """dx, dweight, dbias against float64 central differences of
    L = sum(grad * layer_norm(x, weight, bias)) (the forward recomputes its
    statistics at every step, so this checks the whole chain)."""
    shape, nshape = (3, 4, 5), (4, 5)
    x, w, b, grad = layer_operands(shape, nshape, np.float64, rng)
    _, mean, rstd = attnkit.layer_norm(x, nshape, w, b, return_stats=True)
    dx, dw, db = attnkit.layer_norm_backward(grad, x, mean, rstd, nshape, w)
    _, r = attnkit.rms_norm(x, nshape, w, return_stats=True)
    rdx, rdw = attnkit.rms_norm_backward(grad, x, r, nshape, w)
    h = 1e-6

    def numeric(f, a):
        d = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            e = np.zeros_like(a)
            e[i] = h
            d[i] = (f(a + e) - f(a - e)) / (2 * h)
        return d

    def L(xx, ww, bb):
        return float(np.sum(grad * attnkit.layer_norm(xx, nshape, ww, bb)))

    def R(xx, ww):
        return float(np.sum(grad * attnkit.rms_norm(xx, nshape, ww)))
    tol = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, numeric(lambda a: L(a, w, b), x), **tol)
    np.testing.assert_allclose(dw, numeric(lambda a: L(x, a, b), w), **tol)
    np.testing.assert_allclose(db, numeric(lambda a: L(x, w, a), b), **tol)
    np.testing.assert_allclose(rdx, numeric(lambda a: R(a, w), x), **tol)
    np.testing.assert_allclose(rdw, numeric(lambda a: R(x, a), w), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, nshape", [((8, 768), (768,)), ((3, 5, 7), (5, 7)), ((2, 1), (1,))])
@pytest.mark.parametrize("with_weight", [False, True])
def test_matches_pytorch(simd, dtype, shape, nshape, with_weight, rng):
    torch = torch_or_skip()
    x, w, b, grad = layer_operands(shape, nshape, dtype, rng, with_weight)
    # a row of one element has gradient 0, which PyTorch's float32 misses by
    # its rounding (1.5e-5 at rstd ~ 300)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    out, mean, rstd = attnkit.layer_norm(x, nshape, w, b, return_stats=True)
    t_out, t_mean, t_rstd = torch.ops.aten.native_layer_norm(
        torch.tensor(x), list(nshape), None if w is None else torch.tensor(w),
        None if b is None else torch.tensor(b), 1e-5)
    assert mean.shape == tuple(t_mean.shape) and rstd.shape == tuple(t_rstd.shape)
    np.testing.assert_allclose(mean, t_mean.numpy(), **tol)
    np.testing.assert_allclose(rstd, t_rstd.numpy(), rtol=tol["rtol"])
    # autograd through F.layer_norm and F.rms_norm
    tx = torch.tensor(x, requires_grad=True)
    tw = None if w is None else torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    torch.nn.functional.layer_norm(tx, nshape, tw, tb, 1e-5).backward(torch.tensor(grad))
    dx, dw, db = attnkit.layer_norm_backward(grad, x, mean, rstd, nshape, w)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    if w is not None:
        np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
        np.testing.assert_allclose(db, tb.grad.numpy(), **tol)
    tx = torch.tensor(x, requires_grad=True)
    tw = None if w is None else torch.tensor(w, requires_grad=True)
    eps = float(np.finfo(dtype).eps)
    torch.nn.functional.rms_norm(tx, nshape, tw, eps).backward(torch.tensor(grad))
    _, rr = attnkit.rms_norm(x, nshape, w, return_stats=True)
    rdx, rdw = attnkit.rms_norm_backward(grad, x, rr, nshape, w)
    np.testing.assert_allclose(rdx, tx.grad.numpy(), **tol)
    if w is not None:
        np.testing.assert_allclose(rdw, tw.grad.numpy(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2000, 300), (40, 5000), (777, 33)])
def test_same_bits_on_any_thread_count(dtype, shape, rng):
    x, w, _, grad = layer_operands(shape, shape[-1], dtype, rng)
    _, mean, rstd = attnkit.layer_norm(x, shape[-1], w, return_stats=True)
    _, rr = attnkit.rms_norm(x, shape[-1], w, return_stats=True)
    results = []
    for n in (1, 2, 3):
        with thread_count(n):
            results.append(attnkit.layer_norm_backward(grad, x, mean, rstd, shape[-1], w)
                           + attnkit.rms_norm_backward(grad, x, rr, shape[-1], w))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameter_gradients_accumulate_at_the_binding(dtype, rng):
    x, w, _, grad = layer_operands((70, 41), 41, dtype, rng)
    _, mean, rstd = attnkit.layer_norm(x, 41, w, return_stats=True)
    dw = rng.standard_normal(41).astype(dtype)
    db = rng.standard_normal(41).astype(dtype)
    dw0, db0 = dw.copy(), db.copy()
    dx = np.empty_like(x)
    _kernels.norm_backward(dx, dw, db, grad, mean.reshape(-1), rstd.reshape(-1), x, w)
    fresh = attnkit.layer_norm_backward(grad, x, mean, rstd, 41, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dx, fresh[0])
    np.testing.assert_allclose(dw, dw0 + fresh[1], **tol)
    np.testing.assert_allclose(db, db0 + fresh[2], **tol)
    # None skips a parameter gradient; dx is the same
    dx2 = np.empty_like(x)
    _kernels.norm_backward(dx2, None, None, grad, mean.reshape(-1), rstd.reshape(-1), x, w)
    np.testing.assert_array_equal(dx2, dx)
    dw = np.ones(41, dtype)
    _, rr = attnkit.rms_norm(x, 41, w, return_stats=True)
    _kernels.norm_backward(dx2, dw, None, grad, None, rr.reshape(-1), x, w)
    np.testing.assert_allclose(dw, 1 + attnkit.rms_norm_backward(grad, x, rr, 41, w)[1], **tol)


def test_return_stats():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out, mean, rstd = attnkit.layer_norm(x, (3, 4), return_stats=True)
    assert mean.shape == rstd.shape == (2, 1, 1) and mean.dtype == np.float32
    np.testing.assert_allclose(mean.ravel(), [5.5, 17.5])
    np.testing.assert_array_equal(out, attnkit.layer_norm(x, (3, 4)))
    out, rstd = attnkit.rms_norm(x, 4, return_stats=True)
    assert rstd.shape == (2, 3, 1)
    np.testing.assert_allclose(rstd[..., 0], 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1)), rtol=1e-6)
    # rows of no elements: PyTorch's mean 0 and rstd NaN
    _, mean, rstd = attnkit.layer_norm(np.zeros((3, 0)), 0, return_stats=True)
    assert mean.shape == (3, 1) and np.all(mean == 0) and np.all(np.isnan(rstd))
    dx, dw, db = attnkit.layer_norm_backward(np.zeros((3, 0)), np.zeros((3, 0)), mean, rstd, 0)
    assert dx.shape == (3, 0) and dw.shape == db.shape == (0,)
    dx, dw, db = attnkit.layer_norm_backward(np.zeros((0, 5)), np.zeros((0, 5)), np.zeros((0, 1)),
                                             np.zeros((0, 1)), 5)
    assert dx.shape == (0, 5) and np.all(dw == 0) and np.all(db == 0)
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        attnkit.layer_norm(x, 4, return_stats="yes")


def test_bad_input():
    x = np.zeros((3, 4))
    _, mean, rstd = attnkit.layer_norm(x, 4, return_stats=True)
    with pytest.raises(ValueError, match=r"grad has shape \(3, 5\) but the input has shape \(3, 4\)"):
        attnkit.layer_norm_backward(np.zeros((3, 5)), x, mean, rstd, 4)
    with pytest.raises(TypeError, match="grad has dtype float32 but the input is float64"):
        attnkit.layer_norm_backward(np.zeros((3, 4), np.float32), x, mean, rstd, 4)
    with pytest.raises(ValueError, match=r"mean has shape \(4, 1\), expected \(3, 1\)"):
        attnkit.layer_norm_backward(x, x, np.zeros((4, 1)), rstd, 4)
    with pytest.raises(ValueError, match=r"rstd has shape \(3, 4\), expected \(3, 1\)"):
        attnkit.rms_norm_backward(x, x, x, 4)
    with pytest.raises(TypeError, match="rstd has dtype float32 but the input is float64"):
        attnkit.layer_norm_backward(x, x, mean, rstd.astype(np.float32), 4)
    with pytest.raises(ValueError, match=r"normalized_shape \(5,\) does not match"):
        attnkit.layer_norm_backward(x, x, mean, rstd, 5)
    with pytest.raises(ValueError, match=r"weight has shape \(3,\) but normalized_shape is \(4,\)"):
        attnkit.layer_norm_backward(x, x, mean, rstd, 4, np.ones(3))
    with pytest.raises(TypeError, match="int64"):
        attnkit.rms_norm_backward(x.astype(np.int64), x.astype(np.int64), rstd, 4)
