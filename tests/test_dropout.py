"""Dropout's kernel (csrc/activation.c): which elements it keeps is a hash of
(seed, index), the same as attnkit.reference.dropout's on every SIMD path
and thread count, so that the backward (the same call on the gradient, with
the same seed) drops exactly what the forward dropped."""
import numpy as np
import pytest

import attnkit
from attnkit import functional as F
from attnkit import reference
from threads import thread_count

SIZES = [1, 7, 4095, 4096, 4097, 3 * 4096 + 5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_dropout_is_its_reference(simd, dtype, n, p):
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    expected = reference.dropout(x, p, 12345, dtype=dtype)
    for threads in (1, 2, 3):
        with thread_count(threads):
            np.testing.assert_array_equal(F.dropout(x, p, seed=12345), expected)


def test_the_fraction_dropped_is_p():
    x = np.ones(200_000, np.float32)
    for p in (0.1, 0.3, 0.5):
        kept = np.count_nonzero(F.dropout(x, p, seed=7)) / x.size
        assert abs(kept - (1 - p)) < 4 * np.sqrt(p * (1 - p) / x.size)
    # different seeds, different masks; one seed, one mask whatever the shape
    assert not np.array_equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=2))
    np.testing.assert_array_equal(F.dropout(x.reshape(400, 500), 0.5, seed=3).reshape(-1),
                                  F.dropout(x, 0.5, seed=3))


def test_backward_drops_what_forward_dropped():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50, 70))
    y = F.dropout(x, 0.4, seed=99)
    grad = rng.standard_normal(x.shape)
    dx = F.dropout(grad, 0.4, seed=99)
    np.testing.assert_array_equal(dx == 0, y == 0)
    np.testing.assert_allclose(dx[y != 0], grad[y != 0] / 0.6)


def test_inputs_of_any_layout_and_nan():
    x = np.arange(40.0).reshape(5, 8).T                 # not C-contiguous
    np.testing.assert_array_equal(F.dropout(x, 0.5, seed=5), F.dropout(np.ascontiguousarray(x), 0.5, seed=5))
    nan = np.full(1000, np.nan)
    out = F.dropout(nan, 0.5, seed=5)
    assert np.all((out == 0) | np.isnan(out)) and np.any(out == 0)   # a dropped NaN is 0
    assert F.dropout(nan, 0.5, training=False) is nan


def test_rng_draws_the_seed():
    x = np.ones(5000)
    a = F.dropout(x, 0.5, rng=np.random.default_rng(0))
    seed = int(np.random.default_rng(0).integers(0, 2**32, dtype=np.uint64))
    np.testing.assert_array_equal(a, F.dropout(x, 0.5, seed=seed))
    with pytest.raises(ValueError, match="rng or seed"):
        F.dropout(x, 0.5, rng=np.random.default_rng(0), seed=1)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        F.dropout(x, 0.5, seed=2**32)
    with pytest.raises(TypeError, match="Generator"):
        F.dropout(x, 0.5, rng=np.random.RandomState(0))
    assert attnkit.functional.dropout(x, 0.0, rng=object()) is x    # nothing drawn when nothing drops
