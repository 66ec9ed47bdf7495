"""attnkit's GEMM (F.linear, csrc/gemm.c) against attnkit.reference, on every
SIMD path: both of its paths (few rows, many rows), every activation in its
epilogue, odd shapes, layouts, thread counts, and edits to the weight."""
import time

import numpy as np
import pytest

from attnkit import nn, reference
from attnkit import functional as F
from threads import thread_count
from accuracy import assert_accurate, assert_nonfinite_match, torch_or_skip

DTYPES = [np.float32, np.float64]
# up to 24 rows take the few-rows path, more the rows path (csrc/gemm.c)
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 25, 33, 47, 100, 257]
# (K, N): K past one block of 256 (1031: four and a tail); N past one MR or
# NR panel and not a multiple of either. Kept small: the suite also runs
# under the sanitizers with AVX-512 emulated, a hundred times slower.
SHAPES = [(1, 1), (7, 13), (16, 16), (59, 113), (384, 29), (1031, 9)]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def composed(x, w, b, activation, dtype):
    """The reference: the product in `dtype`, then the activation."""
    y = reference.linear(x, w, b, dtype=dtype)
    if activation is None:
        return y
    if activation == "relu":
        return reference.relu(y, dtype=dtype)
    if activation == "silu":
        return reference.silu(y, dtype=dtype)
    return reference.gelu(y, "tanh" if activation == "gelu_tanh" else "none", dtype=dtype)


def operands(rng, M, K, N, dtype):
    x = rng.standard_normal((M, K)).astype(dtype)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K, N", SHAPES)
def test_every_shape_matches_the_reference(simd, dtype, M, K, N, rng):
    x, w, b = operands(rng, M, K, N, dtype)
    before = [a.copy() for a in (x, w, b)]
    y = F.linear(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype and y.flags.c_contiguous
    assert_accurate(y, lambda dt: reference.linear(x, w, b, dtype=dt), dtype)
    for a, kept in zip((x, w, b), before):
        np.testing.assert_array_equal(a, kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 13, 100, 257])
@pytest.mark.parametrize("K, N", SHAPES)
def test_a_weight_stored_transposed_is_read_in_place(simd, dtype, M, K, N, rng):
    """w.T C-contiguous (a weight kept transposed, a tied embedding's w.T):
    the product path reads it without a copy."""
    x, w, b = operands(rng, M, K, N, dtype)
    wt = np.asfortranarray(w)
    for activation in (None, "gelu"):
        y = F.linear(x, wt, b, activation=activation)
        assert_accurate(y, lambda dt: composed(x, w, b, activation, dt), dtype)


@pytest.mark.parametrize("M", [1, 24, 100])               # the few-rows path, the rows path
@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_residual_is_added_in_the_same_pass(simd, M, layout, activation, rng):
    """f(x @ w.T + b) + residual, bitwise what adding it afterwards gives."""
    x, w, b = operands(rng, M, 40, 70, np.float32)
    if layout == "transposed":
        w = np.asfortranarray(w)
    residual = rng.standard_normal((M, 70)).astype(np.float32)
    kept = residual.copy()
    expected = F.linear(x, w, b, activation=activation) + residual
    np.testing.assert_array_equal(F.linear(x, w, b, activation=activation, residual=residual), expected)
    np.testing.assert_array_equal(F.linear(x, w, None, residual=residual), F.linear(x, w) + residual)
    np.testing.assert_array_equal(residual, kept)
    layer = nn.Linear(40, 70)
    layer.weight[:], layer.bias[:] = w, b
    x3, r3 = x.reshape(1, M, 40), residual.reshape(1, M, 70)
    np.testing.assert_array_equal(layer(x3, residual=r3), layer(x3) + r3)
    np.testing.assert_array_equal(F.linear(x3, layer.weight, b, residual=np.asfortranarray(r3)), layer(x3) + r3)


def test_residual_must_match_the_output(rng):
    x, w, b = operands(rng, 4, 6, 3, np.float32)
    with pytest.raises(ValueError, match=r"residual must be the output's shape \(4, 3\) and dtype float32, "
                                         r"got \(4, 2\) float32"):
        F.linear(x, w, b, residual=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"got \(4, 3\) float64"):
        F.linear(x, w, b, residual=np.zeros((4, 3)))
    assert F.linear(x[:0], w, b, residual=np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M", [3, 60])
@pytest.mark.parametrize("bias", [True, False])
def test_activation_in_the_epilogue(simd, dtype, activation, M, bias, rng):
    x, w, b = operands(rng, M, 67, 45, dtype)
    b = b if bias else None
    y = F.linear(x, w, b, activation=activation)
    assert_accurate(y, lambda dt: composed(x, w, b, activation, dt), dtype, factor=8.0)
    # the same as the product, then the activation on its own
    unfused = F.linear(x, w, b)
    if activation is not None:
        unfused = (F.relu(unfused) if activation == "relu" else F.silu(unfused) if activation == "silu"
                   else F.gelu(unfused, "tanh" if activation == "gelu_tanh" else "none"))
    np.testing.assert_array_equal(y, unfused)


@pytest.mark.parametrize("M", [1, 5, 24, 25, 100, 400])
def test_bitwise_identical_at_any_thread_count(simd, M, rng):
    # N 500: two chunks of features; M 400: two groups of rows (csrc/gemm.c)
    x, w, b = operands(rng, M, 40, 500, np.float32)
    results = []
    for threads in (1, 2, 3):
        with thread_count(threads):
            results.append(F.linear(x, w, b, activation="gelu"))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("M", [24, 96])      # the few-rows path, the rows path
def test_leading_dimensions_and_layouts(M, rng):
    x, w, b = operands(rng, M, 33, 10, np.float32)
    expected = F.linear(x, w, b)
    x4 = x.reshape(2, 3, M // 6, 33)
    np.testing.assert_array_equal(F.linear(x4, w, b), expected.reshape(2, 3, M // 6, 10))
    # a 1-d input is one row: the few-rows path, which may sum in another order
    np.testing.assert_allclose(F.linear(x[5], w, b), expected[5], rtol=1e-6, atol=1e-6)
    wide = np.zeros((2 * M, 33), np.float32)
    wide[::2] = x
    np.testing.assert_array_equal(F.linear(wide[::2], w, b), expected)                 # rows apart
    np.testing.assert_array_equal(F.linear(x[::-1], w, b), expected[::-1])             # reversed rows
    np.testing.assert_array_equal(F.linear(np.asfortranarray(x), w, b), expected)
    # a weight stored transposed is read in place by the other kernel (its
    # sums go in another order)
    np.testing.assert_allclose(F.linear(x, np.asfortranarray(w), b), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(F.linear(np.asfortranarray(x4.T).T, w, b), expected.reshape(x4.shape[:-1] + (10,)))
    col = np.zeros((M, 66), np.float32)
    col[:, ::2] = x                                                                    # strided features
    np.testing.assert_array_equal(F.linear(col[:, ::2], w, b), expected)
    view = np.broadcast_to(x[:1], (M, 33))                                             # one row, M times
    np.testing.assert_array_equal(F.linear(view, w, b), np.broadcast_to(F.linear(view.copy(), w, b)[:1], (M, 10)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_degenerate_shapes(dtype, rng):
    w = rng.standard_normal((5, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    assert F.linear(np.zeros((0, 3), dtype), w, b).shape == (0, 5)
    assert F.linear(np.zeros((2, 0, 3), dtype), w, b).shape == (2, 0, 5)
    assert F.linear(np.zeros((4, 3), dtype), w[:0], b[:0]).shape == (4, 0)
    # K = 0: an empty sum, so the result is f(bias), as in PyTorch
    for M in (1, 40):
        y = F.linear(np.zeros((M, 0), dtype), np.zeros((5, 0), dtype), b, activation="relu")
        np.testing.assert_array_equal(y, np.broadcast_to(np.maximum(b, 0), (M, 5)))
    np.testing.assert_array_equal(F.linear(np.zeros((3, 0), dtype), np.zeros((5, 0), dtype)), 0)


@pytest.mark.parametrize("M", [2, 64])
def test_non_finite_values_propagate_as_in_numpy(M, rng):
    x, w, b = operands(rng, M, 40, 30, np.float32)
    x[0, 3], x[1, 5] = np.nan, np.inf
    w[7, 5] = 0.0                                     # inf * 0 is NaN
    b[2] = -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference.linear(x, w, b, dtype=np.float64).astype(np.float32)
    assert_nonfinite_match(F.linear(x, w, b), expected)
    big = np.full((M, 40), 1e30, np.float32)
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(F.linear(big, np.full((3, 40), 1e30, np.float32))))


def test_a_weight_edited_in_place_is_seen_by_the_next_call(rng):
    """Nothing is cached from the weight: in-place edits, as users and
    optimisers make them, take effect at once."""
    for M in (2, 60):
        lin = nn.Linear(16, 8, rng=rng)
        x = rng.standard_normal((M, 16)).astype(np.float32)
        lin(x)
        lin.weight[:] *= 2
        lin.bias[:] = 0
        np.testing.assert_allclose(lin(x), reference.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight[3, 5] = 100.0
        np.testing.assert_allclose(lin(x), reference.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-4)


def test_threads_follow_set_num_threads(rng):
    """The product runs on attnkit's threads: with one thread, the process's
    CPU time stays near its wall time."""
    x, w, b = operands(rng, 256, 384, 384, np.float32)
    with thread_count(1):
        F.linear(x, w, b)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(20):
            F.linear(x, w, b)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu < 1.5 * wall + 0.01, (cpu, wall)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 9, 70, 400])
def test_matches_pytorch(dtype, M, rng):
    torch = torch_or_skip()
    x, w, b = operands(rng, M, 96, 50, dtype)
    for activation, torch_f in ((None, lambda t: t), ("gelu", torch.nn.functional.gelu),
                                ("silu", torch.nn.functional.silu)):
        expected = torch_f(torch.nn.functional.linear(*map(torch.from_numpy, (x, w, b)))).numpy()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(F.linear(x, w, b, activation=activation), expected, **tol)


def test_bad_input_raises_clear_errors(rng):
    x, w, b = operands(rng, 4, 6, 3, np.float32)
    with pytest.raises(ValueError, match=r"in_features = 6, got input \(4, 5\)"):
        F.linear(x[:, :5], w, b)
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features\)"):
        F.linear(x, w[0], b)
    with pytest.raises(TypeError, match="weight has dtype float64 but the input is float32"):
        F.linear(x, w.astype(np.float64), b)
    with pytest.raises(ValueError, match=r"bias must be \(3,\)"):
        F.linear(x, w, b[:2])
    with pytest.raises(ValueError, match="activation must be None or one of"):
        F.linear(x, w, b, activation="tanh")
    with pytest.raises(TypeError, match="int64"):
        F.linear(x.astype(np.int64), w, b)
