"""The activations' backwards (csrc/activation.c): relu_backward,
gelu_backward (exact and tanh), silu_backward and bias_activation_backward,
against attnkit.reference on every SIMD path, float64 central differences,
PyTorch's autograd, special values, thread counts, accumulation at the
binding, and bad input."""
import numpy as np
import pytest

from attnkit import _kernels, reference
from attnkit import functional as F
from accuracy import assert_accurate, torch_or_skip
from threads import thread_count

DTYPES = [np.float32, np.float64]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
SHAPES = [(1, 1), (7, 59), (3, 113), (5, 257), (2, 1023), (33, 7), (1, 100000)]


def operands(shape, dtype, rng, scale=3.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    bias = rng.standard_normal(shape[-1]).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    return x, bias, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_activation_backward_matches_the_reference(simd, dtype, shape, activation, with_bias, rng):
    x, bias, grad = operands(shape, dtype, rng)
    bias = bias if with_bias else None
    before = [a.copy() for a in (x, grad) + ((bias,) if with_bias else ())]
    dx, db = F.bias_activation_backward(grad, x, bias, activation)
    assert dx.shape == shape and db.shape == (shape[-1],) and dx.dtype == db.dtype == dtype

    def ref(i):
        return lambda dt: reference.bias_activation_backward(grad, x, bias, activation, dtype=dt)[i]
    assert_accurate(dx, ref(0), dtype)
    # dbias sums rows in blocks (colsum.h), NumPy pairwise
    assert_accurate(db, ref(1), dtype, ulps=16)
    for a, kept in zip((x, grad) + ((bias,) if with_bias else ()), before):
        np.testing.assert_array_equal(a, kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 59), (1, 100000), (3, 4, 5)])
def test_elementwise_backwards_match_the_reference(simd, dtype, shape, rng):
    x, _, grad = operands(shape, dtype, rng)
    for kernel, ref in [(F.relu_backward, reference.relu_backward),
                        (F.silu_backward, reference.silu_backward),
                        (F.gelu_backward, reference.gelu_backward),
                        (lambda g, z: F.gelu_backward(g, z, approximate="tanh"),
                         lambda g, z, dtype: reference.gelu_backward(g, z, "tanh", dtype=dtype))]:
        dx = kernel(grad, x)
        assert dx.shape == shape and dx.dtype == dtype
        assert_accurate(dx, lambda dt: ref(grad, x, dtype=dt), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_wide_range_of_inputs(simd, dtype, activation, rng):
    """Far into the tails (|x| up to 30), where the derivatives' terms vanish."""
    x = np.linspace(-30, 30, 2001).astype(dtype).reshape(1, -1)
    grad = rng.standard_normal(x.shape).astype(dtype)
    dx, _ = F.bias_activation_backward(grad, x, None, activation)
    assert_accurate(dx, lambda dt: reference.bias_activation_backward(grad, x, None, activation,
                                                                      dtype=dt)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_special_values(simd, dtype, activation):
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 2.0]], dtype)
    grad = np.ones_like(x)
    dx, db = F.bias_activation_backward(grad, x, None, activation)
    # NaN in stays NaN, but for the identity, whose derivative is 1 whatever x is
    assert np.isnan(dx[0, 0]) == np.isnan(db[0]) == (activation is not None)
    assert not np.isnan(dx[0, 1:]).any()                    # the infinities give the limits
    limits = {None: (1, 1), "relu": (1, 0), "gelu": (1, 0), "gelu_tanh": (1, 0), "silu": (1, 0)}
    np.testing.assert_array_equal(dx[0, [1, 2, 5, 6]], np.array(limits[activation] * 2)[[0, 1, 0, 1]])
    if activation == "relu":        # PyTorch's convention: 0 at x == 0
        np.testing.assert_array_equal(dx[0, 3:5], 0)
    if activation in ("gelu", "gelu_tanh"):
        np.testing.assert_array_equal(dx[0, 3:5], 0.5)
    if activation == "silu":
        np.testing.assert_array_equal(dx[0, 3:5], 0.5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_finite_differences(activation, rng):
    x, bias, grad = operands((4, 9), np.float64, rng, scale=2.0)
    x[0, 0] = 0.3 - bias[0]          # keep relu away from its kink
    x = np.where(np.abs(x + bias) < 1e-3, x + 0.01, x)
    dx, db = F.bias_activation_backward(grad, x, bias, activation)

    def loss(xx, bb):
        return float(np.sum(grad * F.linear(xx, np.eye(9), bb, activation=activation)))

    h = 1e-6
    num_x = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num_x[i] = (loss(x + e, bias) - loss(x - e, bias)) / (2 * h)
    num_b = np.zeros_like(bias)
    for i in range(9):
        e = np.zeros_like(bias)
        e[i] = h
        num_b[i] = (loss(x, bias + e) - loss(x, bias - e)) / (2 * h)
    np.testing.assert_allclose(dx, num_x, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, num_b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_matches_pytorch(simd, dtype, activation, rng):
    torch = torch_or_skip()
    x, bias, grad = operands((13, 257), dtype, rng)
    x[0, :5] = 0
    tx = torch.tensor(x, requires_grad=True)
    tb = torch.tensor(bias, requires_grad=True)
    h = tx + tb
    y = {"relu": torch.relu, "silu": torch.nn.functional.silu,
         "gelu": lambda t: torch.nn.functional.gelu(t),
         "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[activation](h)
    y.backward(torch.tensor(grad))
    dx, db = F.bias_activation_backward(grad, x, bias, activation)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=tol["rtol"], atol=tol["atol"] * 20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(4096, 300), (50, 3000)])
def test_same_bits_on_any_thread_count(dtype, activation, shape, rng):
    x, bias, grad = operands(shape, dtype, rng)
    results = []
    for n in (1, 2, 3):
        with thread_count(n):
            results.append(F.bias_activation_backward(grad, x, bias, activation)
                           + (F.gelu_backward(grad, x),))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dbias_accumulates_at_the_binding(dtype, rng):
    x, bias, grad = operands((70, 41), dtype, rng)
    db = rng.standard_normal(41).astype(dtype)
    db0 = db.copy()
    dx = np.empty_like(x)
    _kernels.bias_activation_backward(dx, db, grad, x, bias, "silu")
    fresh_dx, fresh_db = F.bias_activation_backward(grad, x, bias, "silu")
    np.testing.assert_array_equal(dx, fresh_dx)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db0 + fresh_db, **tol)
    # dx may be the upstream gradient itself
    g = grad.copy()
    _kernels.bias_activation_backward(g, None, g, x, bias, "gelu")
    np.testing.assert_array_equal(g, F.bias_activation_backward(grad, x, bias, "gelu")[0])


def test_non_contiguous_and_empty(rng):
    x, bias, grad = operands((20, 30), np.float32, rng)
    dx, db = F.bias_activation_backward(grad.T, x.T, None, "gelu")
    np.testing.assert_array_equal(dx, F.bias_activation_backward(grad.T.copy(), x.T.copy(), None, "gelu")[0])
    dx, db = F.bias_activation_backward(np.zeros((0, 4)), np.zeros((0, 4)), np.ones(4), "silu")
    assert dx.shape == (0, 4) and np.all(db == 0)
    assert F.relu_backward(np.float32(2.0), np.float32(1.0)) == 2.0


def test_bad_input():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        F.gelu_backward(x, x, approximate="erf")
    with pytest.raises(ValueError, match=r"grad has shape \(3, 5\) but the input has shape \(3, 4\)"):
        F.silu_backward(np.zeros((3, 5)), x)
    with pytest.raises(TypeError, match="grad has dtype float32 but the input is float64"):
        F.relu_backward(np.zeros((3, 4), np.float32), x)
    with pytest.raises(TypeError, match="int64"):
        F.relu_backward(x.astype(np.int64), x.astype(np.int64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        F.bias_activation_backward(x, x, np.zeros(3), "relu")
    with pytest.raises(TypeError, match="bias has dtype float32"):
        F.bias_activation_backward(x, x, np.zeros(4, np.float32), "relu")
    with pytest.raises(ValueError, match="activation must be None or one of"):
        F.bias_activation_backward(x, x, None, "tanh")
    with pytest.raises(ValueError, match="needs a last dimension"):
        F.bias_activation_backward(np.float64(1), np.float64(1))
