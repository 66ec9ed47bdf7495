"""Property tests: random shapes, axes, broadcast masks and non-finite values."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attnkit
from attnkit import _runtime, reference
from accuracy import assert_accurate

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([np.float32, np.float64])
PATHS = st.sampled_from(_runtime.supported_simd_paths())


def float_arrays(dtype, shape, nonfinite=True):
    finite = st.floats(-1e4, 1e4, width=32)
    special = st.sampled_from([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e30, -1e30])
    elements = st.one_of(finite, special) if nonfinite else finite
    return hnp.arrays(dtype, shape, elements=elements)


@st.composite
def softmax_cases(draw):
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9))
    x = draw(float_arrays(dtype, shape))
    axis = draw(st.one_of(
        st.integers(-len(shape), len(shape) - 1),
        st.none(),
        st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True).map(tuple),
    ))
    where = None
    if draw(st.booleans()):
        # shapes that broadcast *to* x's shape (hypothesis's are mutually broadcastable)
        mask_shape = draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=len(shape), min_side=0)
                          .filter(lambda s: np.broadcast_shapes(s, shape) == shape))
        where = draw(hnp.arrays(np.bool_, mask_shape))
    view = draw(st.sampled_from(["as_is", "reversed", "transposed"]))
    if view == "reversed":
        x = x[::-1]
    elif view == "transposed":
        x = x.T
        where = None if where is None else np.broadcast_to(where, shape).T
    return x, axis, where


@SETTINGS
@given(case=softmax_cases(), path=PATHS, log=st.booleans())
def test_softmax_matches_reference(case, path, log):
    x, axis, where = case
    kernel, ref = (attnkit.log_softmax, reference.log_softmax) if log else (attnkit.softmax, reference.softmax)
    before = x.copy()
    with _runtime.use_simd_path(path):
        result = kernel(x, axis=axis, where=where)
    assert result.shape == x.shape and result.dtype == x.dtype
    assert_accurate(result, lambda dt: ref(x, axis=axis, where=where, dtype=dt), x.dtype)
    np.testing.assert_array_equal(x, before)


@SETTINGS
@given(case=softmax_cases(), path=PATHS)
def test_softmax_slices_sum_to_one_or_zero(case, path):
    x, axis, where = case
    with _runtime.use_simd_path(path):
        p = attnkit.softmax(x, axis=axis, where=where)
    if p.size == 0:
        return
    assert np.all((p >= 0) | np.isnan(p)) and np.all((p <= 1) | np.isnan(p))
    sums = np.sum(p, axis=axis)
    ok = np.isnan(sums) | np.isclose(sums, 1, rtol=1e-5) | (sums == 0)
    assert ok.all()


@st.composite
def norm_cases(draw):
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=12))
    k = draw(st.integers(0, len(shape)))
    normalized = shape[len(shape) - k:]
    finite_only = draw(st.booleans())
    x = draw(float_arrays(dtype, shape, nonfinite=not finite_only))
    if draw(st.booleans()):  # the hard case: a large offset plus small noise
        x = (x * 1e-3 + 1e4).astype(dtype)
    weight = draw(st.one_of(st.none(), float_arrays(dtype, normalized, nonfinite=False)))
    bias = draw(st.one_of(st.none(), float_arrays(dtype, normalized, nonfinite=False)))
    eps = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    return x, normalized, weight, bias, eps


@SETTINGS
@given(case=norm_cases(), path=PATHS)
def test_layer_norm_matches_reference(case, path):
    x, normalized, weight, bias, eps = case
    with _runtime.use_simd_path(path):
        result = attnkit.layer_norm(x, normalized, weight, bias, eps)
    # float64 rows near 1e4 need the exact oracle of test_norm.py; float32 is
    # judged by the rule, with room for weight * bias rounding
    assert_accurate(result, lambda dt: reference.layer_norm(x, normalized, weight, bias, eps, dtype=dt),
                    x.dtype, factor=8.0, ulps=16.0 if x.dtype == np.float64 else 8.0)


@SETTINGS
@given(case=norm_cases(), path=PATHS)
def test_rms_norm_matches_reference(case, path):
    x, normalized, weight, _, eps = case
    with _runtime.use_simd_path(path):
        result = attnkit.rms_norm(x, normalized, weight, eps)
    assert_accurate(result, lambda dt: reference.rms_norm(x, normalized, weight, eps, dtype=dt),
                    x.dtype, factor=8.0, ulps=8.0)
