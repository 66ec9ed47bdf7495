"""Regression tests for what the fuzzer (fuzz/fuzz_attnkit.py, tools/fuzz.sh)
found, each minimised to the smallest input that showed it. Plain pytest: no
atheris needed."""
import struct
import zipfile

import numpy as np
import pytest

from attnkit import io as akio


def _npz_with_npy_header(path, header):
    """A .npz of one member, a.npy, whose version-1.0 .npy header is `header`
    (padded as NumPy pads it) and which holds no data."""
    h = header.encode("latin1")
    h += b" " * ((-(10 + len(h) + 1)) % 64) + b"\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h)


@pytest.mark.parametrize("header", ["(", "{(", "{'descr': '<f8', 'fortran_order': False, 'shape': (1,"])
def test_npz_with_unbalanced_npy_header_raises_valueerror(tmp_path, header):
    # NumPy reads a version 1.0/2.0 header that does not parse through a
    # tokenize-based filter, which raises tokenize.TokenError (not a
    # ValueError) on unbalanced brackets; load_state_dict let it through.
    path = tmp_path / "bad.npz"
    _npz_with_npy_header(path, header)
    with pytest.raises(ValueError, match="bad.npz"):
        akio.load_state_dict(path)


def test_npz_with_valid_npy_header_still_loads(tmp_path):
    # the control: the same writer with a well-formed header of an empty array
    path = tmp_path / "ok.npz"
    _npz_with_npy_header(path, "{'descr': '<f8', 'fortran_order': False, 'shape': (0,), }")
    loaded = akio.load_state_dict(path)
    assert list(loaded) == ["a"] and loaded["a"].shape == (0,) and loaded["a"].dtype == np.float64


# _kernels.pyx's rows_stride is declared `except -1` but returns the row stride
# in elements, which is -1 for an (M, 1) input read backwards: Cython takes
# that -1 for an error and the call fails with SystemError ("returned NULL
# without setting an exception"). Found through MultiHeadAttention with a
# 1-wide feature axis; the smallest public reproducer is F.linear itself.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_with_reversed_single_feature_rows(dtype):
    import attnkit.functional as F
    x = np.arange(5, dtype=dtype).reshape(5, 1)[::-1]            # strides (-itemsize, itemsize)
    w = np.full((2, 1), 2, dtype)
    np.testing.assert_array_equal(F.linear(x, w), np.ascontiguousarray(x) @ w.T)


def test_linear_backward_with_reversed_single_feature_rows():
    import attnkit.functional as F
    x = np.arange(3.0).reshape(3, 1)[::-1]
    dx, dw, db = F.linear_backward(np.ones((3, 2)), x, np.ones((2, 1)))
    np.testing.assert_array_equal(dx, np.full((3, 1), 2.0))
    np.testing.assert_array_equal(dw, np.full((2, 1), 3.0))
    np.testing.assert_array_equal(db, np.full(2, 3.0))


def test_nn_linear_with_reversed_single_feature_rows():
    from attnkit import nn
    m = nn.Linear(1, 2, dtype=np.float64, rng=np.random.default_rng(0))
    x = np.arange(3.0).reshape(3, 1)[::-1]
    np.testing.assert_allclose(m(x), m(np.ascontiguousarray(x)))


# nn.Identity.backward returned any grad_output as it was: its forward saves
# the input's shape but the backward never compared the gradient with it,
# where every other module's backward raises ValueError ("grad_output has
# shape ..., but the forward's output was ..."). Found through t_module_layers
# with a gradient of another shape; the wrong-shaped gradient then flows on
# unnoticed through an nn.Sequential.
@pytest.mark.parametrize("wrap", [False, True])
def test_identity_backward_checks_the_gradient_shape(wrap):
    from attnkit import nn
    m = nn.Sequential([nn.Identity()]) if wrap else nn.Identity()
    m.train()
    x = np.ones((3, 4), np.float32)
    m(x)
    np.testing.assert_array_equal(m.backward(np.full((3, 4), 2.0, np.float32)), np.full((3, 4), 2.0))
    with pytest.raises(ValueError, match="shape"):
        m.backward(np.ones((5, 7), np.float32))


# Found by typing the reference (issue 14): its dtype= was called as a
# function, so any dtype NumPy accepts but a scalar type ("float32",
# np.dtype) failed with "'str' object is not callable".
@pytest.mark.parametrize("dtype", ["float32", np.dtype(np.float32), np.float32])
def test_reference_takes_any_dtype_numpy_takes(dtype):
    from attnkit import reference
    x = np.linspace(-2, 2, 24).reshape(2, 3, 4)
    q = x.reshape(1, 2, 3, 4)
    expected = reference.layer_norm(x, 4, dtype=np.float32)
    np.testing.assert_array_equal(reference.layer_norm(x, 4, dtype=dtype), expected)
    np.testing.assert_array_equal(reference.rms_norm(x, 4, dtype=dtype),
                                  reference.rms_norm(x, 4, dtype=np.float32))
    np.testing.assert_array_equal(reference.dropout(x, 0.5, 3, dtype=dtype),
                                  reference.dropout(x, 0.5, 3, dtype=np.float32))
    np.testing.assert_array_equal(reference.gelu_backward(x, x, dtype=dtype),
                                  reference.gelu_backward(x, x, dtype=np.float32))
    out = reference.scaled_dot_product_attention(q, q, q, dtype=dtype)[0]
    assert out.dtype == np.float32


def test_reference_attention_dropout_needs_its_seed():
    from attnkit import reference
    q = np.ones((1, 1, 2, 4))
    with pytest.raises(ValueError, match="dropout_p=0.5 needs dropout_seed"):
        reference.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with pytest.raises(ValueError, match="dropout_p=0.5 needs dropout_seed"):
        reference.scaled_dot_product_attention_backward(q, q, q, q, dropout_p=0.5)


# nn.Tanh's forward on a 0-d array gave a NumPy scalar (np.float64), not a 0-d
# ndarray as every other activation module does (np.tanh of a 0-d array
# returns a scalar). Found through t_module_layers on a shape () input.
@pytest.mark.parametrize("name", ["Tanh", "GELU", "ReLU", "SiLU", "Sigmoid", "Identity"])
def test_activation_module_on_a_0d_array_returns_an_ndarray(name):
    from attnkit import nn
    m = getattr(nn, name)()
    m.train()
    y = m(np.array(0.5))
    assert isinstance(y, np.ndarray) and y.shape == () and y.dtype == np.float64
    dx = m.backward(np.array(1.0))                      # and so does its backward
    assert isinstance(dx, np.ndarray) and dx.shape == () and dx.dtype == np.float64
