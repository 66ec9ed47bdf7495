"""The linear layer's backward products (F.linear_backward, csrc/gemm.c's
product): dx = dy @ W, dW += dy^T x, db += column sums of dy, against a
higher-precision reference on every SIMD path, for both weight layouts
(PyTorch's rows, and stored transposed), accumulation, thread counts,
PyTorch's autograd, and bad input."""

import numpy as np
import pytest

from attnkit import functional as F
from threads import thread_count
from accuracy import assert_accurate, torch_or_skip

DTYPES = [np.float32, np.float64]
# M is the reduction of dW: past one block of K (256) and a few rows; small
# enough for the sanitized, AVX-512-emulated run
ROWS = [1, 3, 13, 97, 300]
SHAPES = [(1, 1), (7, 13), (40, 33), (129, 70)]        # (K, N)


def operands(rng, M, K, N, dtype):
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(dtype)
    dy = rng.standard_normal((M, N)).astype(dtype)
    return x, w, dy


def layouts(w):
    """w in PyTorch's layout and stored transposed (w.T C-contiguous)."""
    return {"rows": w, "transposed": np.asfortranarray(w)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K, N", SHAPES)
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_every_shape_matches_the_reference(simd, dtype, M, K, N, layout, rng):
    x, w, dy = operands(rng, M, K, N, dtype)
    weight = layouts(w)[layout]
    before = [a.copy() for a in (x, weight, dy)]
    dx, dw, db = F.linear_backward(dy, x, weight)
    assert dx.shape == (M, K) and dw.shape == (N, K) and db.shape == (N,)
    assert dw.flags.f_contiguous == (layout == "transposed" and N > 1 and K > 1) or dw.flags.c_contiguous
    assert_accurate(dx, lambda dt: dy.astype(dt) @ w.astype(dt), dtype)
    # dW and db sum over the M rows one after another (in blocks of 256 for
    # dW), NumPy pairwise: a sum of M terms of either sign may round a few
    # ulps of its result further off than NumPy's
    assert_accurate(dw, lambda dt: dy.astype(dt).T @ x.astype(dt), dtype, ulps=16)
    assert_accurate(db, lambda dt: dy.astype(dt).sum(axis=0), dtype, ulps=16)
    for a, kept in zip((x, weight, dy), before):
        np.testing.assert_array_equal(a, kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_gradients_accumulate_in_place(simd, dtype, order, rng):
    x, w, dy = operands(rng, 70, 40, 33, dtype)
    dw = np.asarray(rng.standard_normal((33, 40)), dtype=dtype, order=order)
    db = rng.standard_normal(33).astype(dtype)
    dw0, db0 = dw.copy(), db.copy()
    dx, dw_out, db_out = F.linear_backward(dy, x, w, weight_grad=dw, bias_grad=db)
    assert dw_out is dw and db_out is db
    _, dw_fresh, db_fresh = F.linear_backward(dy, x, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw0 + dw_fresh, **tol)
    np.testing.assert_allclose(db, db0 + db_fresh, **tol)
    # an accumulator in a layout the kernel cannot write goes through a copy
    strided = np.zeros((33, 80), dtype)[:, ::2]
    F.linear_backward(dy, x, w, weight_grad=strided)
    np.testing.assert_allclose(strided, dw_fresh, **tol)


def test_skipped_gradients_are_not_computed(rng):
    x, w, dy = operands(rng, 20, 8, 6, np.float32)
    dx, dw, db = F.linear_backward(dy, x, w, input_grad=False, weight_grad=False, bias_grad=False)
    assert dx is None and dw is None and db is None
    dx, dw, db = F.linear_backward(dy, x, w, weight_grad=False)
    assert dw is None and dx.shape == (20, 8) and db.shape == (6,)


def test_leading_dimensions_and_input_layouts(rng):
    x, w, dy = operands(rng, 24, 10, 7, np.float64)
    expected = F.linear_backward(dy, x, w)
    got = F.linear_backward(dy.reshape(2, 3, 4, 7), x.reshape(2, 3, 4, 10), w)
    assert got[0].shape == (2, 3, 4, 10)
    np.testing.assert_array_equal(got[0].reshape(24, 10), expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    wide = np.zeros((24, 20))
    wide[:, ::2] = x
    got = F.linear_backward(np.asfortranarray(dy), wide[:, ::2], w)                # strided features
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    got = F.linear_backward(dy[0], x[0], w)                                           # one row, 1-d
    np.testing.assert_allclose(got[1], np.outer(dy[0], x[0]), rtol=1e-14)


@pytest.mark.parametrize("M", [1, 13, 300])
def test_bitwise_identical_at_any_thread_count(simd, M, rng):
    x, w, dy = operands(rng, M, 300, 130, np.float32)
    for weight in layouts(w).values():
        results = []
        for threads in (1, 2, 3):
            with thread_count(threads):
                results.append(F.linear_backward(dy, x, weight))
        for other in results[1:]:
            for a, b in zip(other, results[0]):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_shapes(dtype, rng):
    w = rng.standard_normal((5, 3)).astype(dtype)
    dx, dw, db = F.linear_backward(np.zeros((0, 5), dtype), np.zeros((0, 3), dtype), w)
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
    # N = 0: dx is an empty sum, 0
    dx, dw, db = F.linear_backward(np.zeros((4, 0), dtype), np.ones((4, 3), dtype), w[:0])
    np.testing.assert_array_equal(dx, np.zeros((4, 3)))
    assert dw.shape == (0, 3) and db.shape == (0,)
    # K = 0: only the bias has a gradient
    dy = rng.standard_normal((4, 5)).astype(dtype)
    dx, dw, db = F.linear_backward(dy, np.zeros((4, 0), dtype), np.zeros((5, 0), dtype))
    assert dx.shape == (4, 0) and dw.shape == (5, 0)
    np.testing.assert_allclose(db, dy.sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 9, 300])
def test_matches_pytorch_autograd(dtype, M, rng):
    torch = torch_or_skip()
    x, w, dy = operands(rng, M, 96, 50, dtype)
    b = rng.standard_normal(50).astype(dtype)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.linear(tx, tw, tb).backward(torch.from_numpy(dy))
    dx, dw, db = F.linear_backward(dy, x, w)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_matches_float64_finite_differences(layout, rng):
    """Central differences of loss = sum(dy * (x @ W.T + b)) in float64: the
    loss is linear in each argument, so they are exact but for rounding."""
    M, K, N = 5, 7, 6
    x, w, dy = operands(rng, M, K, N, np.float64)
    b = rng.standard_normal(N)
    weight = layouts(w)[layout]
    dx, dw, db = F.linear_backward(dy, x, weight)

    def loss(x_, w_, b_):
        return float(np.sum(dy * F.linear(x_, w_, b_)))

    def numeric(array, bump):
        grad = np.empty(array.shape)
        for index in np.ndindex(array.shape):
            up, down = array.copy(), array.copy()
            up[index] += 1e-6
            down[index] -= 1e-6
            grad[index] = (bump(up) - bump(down)) / 2e-6
        return grad

    np.testing.assert_allclose(dx, numeric(x, lambda v: loss(v, weight, b)), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dw, numeric(w, lambda v: loss(x, v, b)), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(db, numeric(b, lambda v: loss(x, weight, v)), rtol=1e-7, atol=1e-8)


def test_a_weight_in_neither_layout_is_copied(rng):
    """Neither rows nor columns contiguous: the functions read a copy, with
    the result the contiguous weight gives."""
    x, w, dy = operands(rng, 30, 9, 11, np.float32)
    spread = np.zeros((22, 18), np.float32)
    spread[::2, ::2] = w
    weight = spread[::2, ::2]
    for got, want in zip(F.linear_backward(dy, x, weight), F.linear_backward(dy, x, w)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(F.linear(x, weight), F.linear(x, w))


def test_bad_input_raises_clear_errors(rng):
    x, w, dy = operands(rng, 4, 6, 3, np.float32)
    with pytest.raises(ValueError, match=r"grad_output \(\.\.\., 3\) and input \(\.\.\., 6\).*got grad_output "
                                         r"\(4, 3\) and input \(4, 5\)"):
        F.linear_backward(dy, x[:, :5], w)
    with pytest.raises(ValueError, match="same leading dimensions"):
        F.linear_backward(dy[:3], x, w)
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features\)"):
        F.linear_backward(dy, x, w[0])
    with pytest.raises(TypeError, match="must share a dtype"):
        F.linear_backward(dy, x.astype(np.float64), w)
    with pytest.raises(ValueError, match=r"weight_grad must be \(3, 6\) of float32"):
        F.linear_backward(dy, x, w, weight_grad=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"bias_grad must be \(3,\) of float32"):
        F.linear_backward(dy, x, w, bias_grad=np.zeros(3))
    with pytest.raises(TypeError, match="weight_grad must be None, False or an ndarray"):
        F.linear_backward(dy, x, w, weight_grad=[0.0])
    with pytest.raises(ValueError, match="weight_grad overlaps weight"):
        F.linear_backward(dy, x, w, weight_grad=w)
    frozen = np.zeros(3, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="bias_grad is read-only"):
        F.linear_backward(dy, x, w, bias_grad=frozen)
    with pytest.raises(TypeError, match="int64"):
        F.linear_backward(dy.astype(np.int64), x, w)
