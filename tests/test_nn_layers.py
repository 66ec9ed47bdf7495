"""attnkit.nn.init, the layers of attnkit.nn and the Module API: against the
formulas, against compositions of attnkit.reference functions (the accuracy
rule of accuracy.py), and against torch.nn with the same weights loaded."""
import math

import numpy as np
import pytest

from attnkit import functional as F, nn, reference
from attnkit.nn import init
from accuracy import assert_accurate, torch_or_skip

DTYPES = [np.float32, np.float64]


def torch_dtype(torch, dtype):
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def assert_close_to_torch(actual, expected, dtype):
    """Max abs difference <= 1e-5 (float32) or 1e-10 (float64) of the output's scale."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == np.dtype(dtype), actual.dtype
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = scale or 1.0
    tol = (1e-5 if np.dtype(dtype) == np.float32 else 1e-10) * scale
    err = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
    assert err <= tol, f"max abs difference {err:.3g} > {tol:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------
# nn.init

def assert_uniform(w, low, high):
    """All of w in [low, high], reaching close to both ends, with the uniform std."""
    assert w.min() >= low and w.max() <= high, (w.min(), w.max(), low, high)
    width = high - low
    assert w.min() < low + 0.02 * width and w.max() > high - 0.02 * width
    std = width / math.sqrt(12)
    assert abs(w.std() - std) < 0.02 * std, (w.std(), std)
    assert abs(w.mean() - (low + high) / 2) < 0.02 * width


def assert_normal(w, mean, std):
    """Sample mean and std of a large w within a few standard errors."""
    n = w.size
    assert abs(w.mean() - mean) < 5 * std / math.sqrt(n), (w.mean(), mean)
    assert abs(w.std() - std) < 0.02 * std, (w.std(), std)


def test_calculate_gain_values():
    for name in ("linear", "identity", "sigmoid", "conv1d", "conv2d", "conv3d"):
        assert init.calculate_gain(name) == 1.0
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01**2)))
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert init.calculate_gain("leaky_relu", 0) == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("selu") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="softsign"):
        init.calculate_gain("softsign")


def test_calculate_gain_matches_pytorch():
    torch = torch_or_skip()
    for args in [("linear",), ("sigmoid",), ("tanh",), ("relu",), ("leaky_relu",),
                 ("leaky_relu", 0.3), ("selu",), ("conv2d",)]:
        assert init.calculate_gain(*args) == pytest.approx(torch.nn.init.calculate_gain(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_xavier_uniform(dtype, gain, rng):
    w = np.empty((300, 200), dtype)
    out = init.xavier_uniform_(w, gain=gain, rng=rng)
    assert out is w and w.dtype == dtype
    bound = gain * math.sqrt(6 / (200 + 300))
    assert_uniform(w.astype(np.float64), -bound, bound)


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_xavier_normal(gain, rng):
    w = np.empty((300, 200), np.float32)
    assert init.xavier_normal_(w, gain=gain, rng=rng) is w
    assert_normal(w.astype(np.float64), 0.0, gain * math.sqrt(2 / (200 + 300)))


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity, a", [("relu", 0.0), ("leaky_relu", 0.0),
                                             ("leaky_relu", math.sqrt(5)), ("tanh", 0.0)])
def test_kaiming_uniform(mode, nonlinearity, a, rng):
    w = np.empty((150, 400), np.float64)
    assert init.kaiming_uniform_(w, a=a, mode=mode, nonlinearity=nonlinearity, rng=rng) is w
    fan = 400 if mode == "fan_in" else 150
    bound = init.calculate_gain(nonlinearity, a) * math.sqrt(3 / fan)
    assert_uniform(w, -bound, bound)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity, a", [("relu", 0.0), ("leaky_relu", 0.1), ("linear", 0.0)])
def test_kaiming_normal(mode, nonlinearity, a, rng):
    w = np.empty((150, 400), np.float64)
    assert init.kaiming_normal_(w, a=a, mode=mode, nonlinearity=nonlinearity, rng=rng) is w
    fan = 400 if mode == "fan_in" else 150
    assert_normal(w, 0.0, init.calculate_gain(nonlinearity, a) / math.sqrt(fan))


def test_kaiming_uniform_with_a_sqrt5_is_one_over_sqrt_fan_in(rng):
    """nn.Linear's default: kaiming_uniform_(a=sqrt(5)) gives U(+-1/sqrt(fan_in))."""
    w = init.kaiming_uniform_(np.empty((200, 250)), a=math.sqrt(5), rng=rng)
    assert_uniform(w, -1 / math.sqrt(250), 1 / math.sqrt(250))


def test_fans_of_a_4d_weight(rng):
    """(out, in, kh, kw): fan_in = in * kh * kw, fan_out = out * kh * kw."""
    shape = (64, 32, 3, 3)
    fan_in, fan_out = 32 * 9, 64 * 9
    w = init.kaiming_uniform_(np.empty(shape), nonlinearity="relu", mode="fan_in", rng=rng)
    assert_uniform(w, -math.sqrt(6 / fan_in), math.sqrt(6 / fan_in))
    w = init.kaiming_uniform_(np.empty(shape), nonlinearity="relu", mode="fan_out", rng=rng)
    assert_uniform(w, -math.sqrt(6 / fan_out), math.sqrt(6 / fan_out))
    w = init.xavier_uniform_(np.empty(shape), rng=rng)
    b = math.sqrt(6 / (fan_in + fan_out))
    assert_uniform(w, -b, b)
    w = init.kaiming_normal_(np.empty(shape), mode="fan_out", nonlinearity="linear", rng=rng)
    assert_normal(w, 0.0, 1 / math.sqrt(fan_out))


def test_fans_of_a_2d_weight(rng):
    """(out, in): fan_in = in, fan_out = out (a non-square weight tells them apart)."""
    w = init.kaiming_normal_(np.empty((100, 900)), mode="fan_in", nonlinearity="linear", rng=rng)
    assert_normal(w, 0.0, 1 / 30)
    w = init.kaiming_normal_(np.empty((100, 900)), mode="fan_out", nonlinearity="linear", rng=rng)
    assert_normal(w, 0.0, 1 / 10)


def test_uniform_and_normal(rng):
    w = np.empty((400, 250), np.float32)
    assert init.uniform_(w, -3.0, 5.0, rng=rng) is w
    assert_uniform(w.astype(np.float64), -3.0, 5.0)
    assert_uniform(init.uniform_(np.empty(100000), rng=rng), 0.0, 1.0)   # default U(0, 1)
    w = np.empty(100000)
    assert init.normal_(w, 2.0, 0.5, rng=rng) is w
    assert_normal(w, 2.0, 0.5)
    assert_normal(init.normal_(np.empty(100000), rng=rng), 0.0, 1.0)     # default N(0, 1)
    # 1-d arrays are fine for the initialisers that need no fans
    assert init.uniform_(np.empty(3), rng=rng).shape == (3,)


def test_zeros_ones_constant():
    w = np.full((3, 4), 7.0, np.float32)
    assert init.zeros_(w) is w and w.dtype == np.float32
    np.testing.assert_array_equal(w, 0)
    assert init.ones_(w) is w
    np.testing.assert_array_equal(w, 1)
    assert init.constant_(w, -2.5) is w
    np.testing.assert_array_equal(w, -2.5)
    v = init.constant_(np.empty(5), 0.125)   # 1-d works: no fans needed
    np.testing.assert_array_equal(v, 0.125)


RNG_INITIALISERS = [
    ("xavier_uniform_", {}), ("xavier_normal_", {}), ("kaiming_uniform_", {}),
    ("kaiming_normal_", {}), ("uniform_", {}), ("normal_", {}),
]


@pytest.mark.parametrize("name, kwargs", RNG_INITIALISERS, ids=[n for n, _ in RNG_INITIALISERS])
def test_seeded_rng_reproduces(name, kwargs):
    fn = getattr(init, name)
    a = fn(np.empty((20, 30)), rng=np.random.default_rng(123), **kwargs)
    b = fn(np.empty((20, 30)), rng=np.random.default_rng(123), **kwargs)
    c = fn(np.empty((20, 30)), rng=np.random.default_rng(124), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # no rng: a fresh generator each time, so two calls differ
    assert not np.array_equal(fn(np.empty((20, 30))), fn(np.empty((20, 30))))


@pytest.mark.parametrize("name", ["xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                                  "kaiming_normal_"])
def test_one_dimensional_array_has_no_fans(name):
    with pytest.raises(ValueError, match=r"2 or more dimensions.*\(5,\)"):
        getattr(init, name)(np.empty(5))
    with pytest.raises(ValueError, match="2 or more dimensions"):
        getattr(init, name)(np.empty(()))


@pytest.mark.parametrize("name", ["kaiming_uniform_", "kaiming_normal_"])
def test_bad_mode(name):
    with pytest.raises(ValueError, match="fan_avg"):
        getattr(init, name)(np.empty((3, 4)), mode="fan_avg")


@pytest.mark.parametrize("name, kwargs", RNG_INITIALISERS, ids=[n for n, _ in RNG_INITIALISERS])
@pytest.mark.parametrize("bad", [0, np.random.RandomState(0), "seed"], ids=["int", "RandomState", "str"])
def test_rng_must_be_a_generator(name, kwargs, bad):
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        getattr(init, name)(np.empty((3, 4)), rng=bad, **kwargs)


# ---------------------------------------------------------------------------
# Default initialisation of the layers, as PyTorch's

def test_linear_default_init(rng):
    lin = nn.Linear(250, 400, rng=rng)
    bound = 1 / math.sqrt(250)
    assert lin.weight.shape == (400, 250) and lin.bias.shape == (400,)
    assert lin.weight.dtype == np.float32 and lin.bias.dtype == np.float32
    assert_uniform(lin.weight.astype(np.float64), -bound, bound)
    assert np.all(np.abs(lin.bias) <= bound) and np.abs(lin.bias).max() > 0.9 * bound
    assert nn.Linear(3, 4, bias=False).bias is None


def test_linear_default_init_matches_pytorch(rng):
    """Same distribution as torch.nn.Linear's: both within +-1/sqrt(in) with the
    uniform's standard deviation."""
    torch = torch_or_skip()
    torch.manual_seed(0)
    theirs = torch.nn.Linear(250, 400).weight.detach().numpy().astype(np.float64)
    ours = nn.Linear(250, 400, rng=rng).weight.astype(np.float64)
    bound = 1 / math.sqrt(250)
    assert_uniform(theirs, -bound, bound)
    assert_uniform(ours, -bound, bound)
    assert abs(ours.std() - theirs.std()) < 0.02 * theirs.std()


def test_norm_layers_default_init():
    ln = nn.LayerNorm((3, 4))
    np.testing.assert_array_equal(ln.weight, np.ones((3, 4)))
    np.testing.assert_array_equal(ln.bias, np.zeros((3, 4)))
    assert nn.LayerNorm(4, bias=False).bias is None
    no_affine = nn.LayerNorm(4, elementwise_affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    np.testing.assert_array_equal(nn.RMSNorm(5).weight, np.ones(5))
    bn = nn.BatchNorm1d(6)
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert int(bn.num_batches_tracked) == 0


def test_embedding_default_init(rng):
    emb = nn.Embedding(1000, 64, rng=rng)
    assert_normal(emb.weight.astype(np.float64), 0.0, 1.0)
    emb = nn.Embedding(1000, 64, padding_idx=7, rng=rng)
    np.testing.assert_array_equal(emb.weight[7], 0)
    assert np.all(np.any(np.delete(emb.weight, 7, axis=0) != 0, axis=1))


def test_default_init_of_norms_and_embedding_matches_pytorch():
    torch = torch_or_skip()
    torch.manual_seed(0)
    for ours, theirs in [(nn.LayerNorm(6), torch.nn.LayerNorm(6)),
                         (nn.BatchNorm1d(6), torch.nn.BatchNorm1d(6)),
                         (nn.RMSNorm(6), torch.nn.RMSNorm(6))]:
        t = torch_state(theirs)
        for key, value in ours.state_dict().items():
            np.testing.assert_array_equal(value, t[key], err_msg=key)
    theirs = torch.nn.Embedding(1000, 64, padding_idx=3).weight.detach().numpy().astype(np.float64)
    ours = nn.Embedding(1000, 64, padding_idx=3, rng=np.random.default_rng(0)).weight.astype(np.float64)
    np.testing.assert_array_equal(theirs[3], 0)
    np.testing.assert_array_equal(ours[3], 0)
    assert abs(ours.std() - theirs.std()) < 0.02 and abs(ours.mean() - theirs.mean()) < 0.02


def test_seeded_layers_reproduce():
    a = nn.Linear(5, 7, rng=np.random.default_rng(1))
    b = nn.Linear(5, 7, rng=np.random.default_rng(1))
    c = nn.Linear(5, 7, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)
    e1 = nn.Embedding(9, 3, rng=np.random.default_rng(5)).weight
    e2 = nn.Embedding(9, 3, rng=np.random.default_rng(5)).weight
    np.testing.assert_array_equal(e1, e2)


# ---------------------------------------------------------------------------
# Layers against compositions of attnkit.reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(dtype, bias, rng):
    lin = nn.Linear(13, 6, bias=bias, dtype=dtype, rng=rng)
    x = rng.standard_normal((2, 5, 13)).astype(dtype)
    y = lin(x)
    assert y.shape == (2, 5, 6)
    assert_accurate(y, lambda dt: reference.linear(x, lin.weight, lin.bias, dtype=dt), dtype)


def test_linear_refuses_another_dtype(rng):
    lin = nn.Linear(3, 2, rng=rng)
    with pytest.raises(TypeError, match="float64.*float32"):
        lin(np.ones((4, 3)))
    with pytest.raises(ValueError, match="in_features"):
        lin(np.ones((4, 5), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalized_shape", [17, (3, 8)])
def test_layer_norm_matches_reference(simd, dtype, normalized_shape, rng):
    ln = nn.LayerNorm(normalized_shape, eps=1e-4, dtype=dtype)
    shape = ln.normalized_shape
    ln.weight = rng.standard_normal(shape)
    ln.bias = rng.standard_normal(shape)
    assert ln.weight.dtype == dtype   # assignment keeps the parameter's dtype
    x = (rng.standard_normal((4, 5) + shape) * 3 + 2).astype(dtype)
    assert_accurate(ln(x), lambda dt: reference.layer_norm(x, shape, ln.weight, ln.bias, 1e-4, dtype=dt),
                    dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_reference(simd, dtype, eps, rng):
    rms = nn.RMSNorm(19, eps=eps, dtype=dtype)
    rms.weight = rng.standard_normal(19)
    x = (rng.standard_normal((6, 19)) * 2).astype(dtype)
    eps_ = np.finfo(dtype).eps if eps is None else eps
    assert_accurate(rms(x), lambda dt: reference.rms_norm(x, 19, rms.weight, eps_, dtype=dt), dtype)


NO_AFFINE = {
    "LayerNorm": (lambda dt: nn.LayerNorm(7, elementwise_affine=False, dtype=dt),
                  lambda x, dt: reference.layer_norm(x, 7, dtype=dt)),
    "RMSNorm": (lambda dt: nn.RMSNorm(7, eps=1e-6, elementwise_affine=False, dtype=dt),
                lambda x, dt: reference.rms_norm(x, 7, eps=1e-6, dtype=dt)),
    "BatchNorm1d": (lambda dt: nn.BatchNorm1d(7, affine=False, dtype=dt),
                    lambda x, dt: reference.batch_norm(x, training=True, dtype=dt)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(NO_AFFINE))
def test_norms_without_affine_parameters_compute_in_their_dtype(simd, dtype, kind, rng):
    """A norm layer with no weight or bias still has a dtype (the one it was
    made with) and takes input of that dtype."""
    make, ref = NO_AFFINE[kind]
    layer = make(dtype)
    x = (rng.standard_normal((5, 7)) * 3 + 1).astype(dtype)
    assert_accurate(layer(x), lambda dt: ref(x, dt), dtype)
    assert layer.dtype == dtype


def activation_inputs(rng, dtype):
    special = [-50, -20, -8, -3, -1, -1e-3, -0.0, 0.0, 1e-30, 1e-3, 0.5, 1, 3, 8, 20, 50,
               -14, 14, -1e4, 1e4, -1e6, 1e6]
    return np.concatenate([rng.standard_normal(200) * 4, special]).reshape(-1, 6).astype(dtype)


ACTIVATIONS = {
    "relu": (nn.ReLU, lambda x, dt: reference.relu(x, dtype=dt)),
    "gelu": (lambda: nn.GELU(), lambda x, dt: reference.gelu(x, dtype=dt)),
    "gelu_tanh": (lambda: nn.GELU("tanh"), lambda x, dt: reference.gelu(x, "tanh", dtype=dt)),
    "silu": (nn.SiLU, lambda x, dt: reference.silu(x, dtype=dt)),
    "sigmoid": (nn.Sigmoid, lambda x, dt: reference.sigmoid(x, dtype=dt)),
    # tanh(x) = 2 sigmoid(2x) - 1
    "tanh": (nn.Tanh, lambda x, dt: 2 * reference.sigmoid(2 * np.asarray(x, dt), dtype=dt) - 1),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_reference(simd, dtype, name, rng):
    make, ref = ACTIVATIONS[name]
    x = activation_inputs(rng, dtype)
    x_before = x.copy()
    y = make()(x)
    assert y.shape == x.shape
    assert_accurate(y, lambda dt: ref(x, dt), dtype)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh", "silu"])
def test_activation_out_in_place_strided_and_overlapping(dtype, name, rng):
    func = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x, out=None: F.gelu(x, "tanh", out=out),
            "silu": F.silu}[name]
    x = (rng.standard_normal((6, 33)) * 3).astype(dtype)
    expected = func(x)
    inplace = x.copy()
    assert func(inplace, out=inplace) is inplace                     # out may be x itself
    np.testing.assert_array_equal(inplace, expected)
    strided = np.zeros((6, 66), dtype)[:, ::2]                        # not contiguous: still filled
    assert func(x, out=strided) is strided
    np.testing.assert_array_equal(strided, expected)
    buffer = np.concatenate([x.ravel(), np.zeros(1, dtype)])          # out overlaps x shifted by one
    result = func(buffer[:-1].reshape(6, 33), out=buffer[1:].reshape(6, 33))
    np.testing.assert_array_equal(result, expected)
    with pytest.raises(TypeError, match="dtype"):
        func(x, out=np.empty((6, 33), np.float16))
    with pytest.raises(ValueError, match="shape"):
        func(x, out=np.empty((6, 32), dtype))
    readonly = np.empty_like(x)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        func(x, out=readonly)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_infinities_and_nan(simd, dtype):
    x = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, 0.0, -0.0, 1.0], dtype)
    y = F.gelu(x)
    assert y[0] == np.inf and np.isnan(y[1]) and np.isnan(y[2])    # -inf * Phi(-inf) = -inf * 0
    assert y[3] == dtype(1e30) and y[4] == 0 and y[5] == 0 and y[6] == 0
    np.testing.assert_allclose(y[7], 0.8413447460685429, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 0, 7), (4, 130)])
def test_linear_with_activation_matches_composition(simd, dtype, activation, shape, rng):
    """F.linear(..., activation=name) does the bias add and the activation in
    one pass; the result is the two done one after the other."""
    out_features = 33
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((out_features, shape[-1])) / 3).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype)
    after = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
             "gelu_tanh": lambda y: F.gelu(y, "tanh")}[activation]
    ref_after = {None: lambda y, dt: y, "relu": lambda y, dt: reference.relu(y, dtype=dt),
                 "gelu": lambda y, dt: reference.gelu(y, dtype=dt),
                 "gelu_tanh": lambda y, dt: reference.gelu(y, "tanh", dtype=dt),
                 "silu": lambda y, dt: reference.silu(y, dtype=dt)}[activation]
    for bias in (b, None):
        x_before = x.copy()
        got = F.linear(x, w, bias, activation=activation)
        assert got.shape == shape[:-1] + (out_features,) and got.dtype == dtype
        np.testing.assert_array_equal(got, after(F.linear(x, w, bias)))   # the same, in one pass
        np.testing.assert_array_equal(x, x_before)
        assert_accurate(got, lambda dt: ref_after(reference.linear(x, w, bias, dtype=dt), dt), dtype)
    with pytest.raises(ValueError, match="activation"):
        F.linear(x, w, b, activation="tanh")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_relu_keeps_nan(simd, dtype):
    """The fused ReLU is max(x, 0) with NaN kept, as F.relu and torch.relu."""
    x = np.array([[1.0, np.nan, -2.0], [-1.0, 0.5, 3.0]], dtype)
    w = np.eye(3, dtype=dtype)
    got = F.linear(x, w, np.zeros(3, dtype), activation="relu")
    np.testing.assert_array_equal(got, [[np.nan] * 3, [0.0, 0.5, 3.0]])


def test_gelu_bad_approximate():
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("erf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6)], ids=["NC", "NCL"])
def test_batch_norm_training_matches_reference_and_updates_running_stats(dtype, shape, rng):
    bn = nn.BatchNorm1d(5, dtype=dtype)
    bn.weight = rng.random(5) + 0.5
    bn.bias = rng.standard_normal(5)
    axes = (0,) if len(shape) == 2 else (0, 2)
    count = shape[0] * (shape[2] if len(shape) == 3 else 1)
    expected_mean, expected_var = np.zeros(5), np.ones(5)
    for step in range(1, 4):
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        y = bn(x)
        assert_accurate(y, lambda dt: reference.batch_norm(x, weight=bn.weight, bias=bn.bias,
                                                           training=True, dtype=dt), dtype)
        x64 = x.astype(np.float64)
        expected_mean = 0.9 * expected_mean + 0.1 * x64.mean(axis=axes)
        expected_var = 0.9 * expected_var + 0.1 * x64.var(axis=axes) * count / (count - 1)
        rtol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(bn.running_mean, expected_mean, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(bn.running_var, expected_var, rtol=rtol, atol=rtol)
        assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
        assert int(bn.num_batches_tracked) == step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6)], ids=["NC", "NCL"])
def test_batch_norm_eval_uses_running_stats(dtype, shape, rng):
    bn = nn.BatchNorm1d(5, eps=1e-3, dtype=dtype)
    bn.weight = rng.random(5) + 0.5
    bn.bias = rng.standard_normal(5)
    bn.running_mean[:] = rng.standard_normal(5) * 0.5
    bn.running_var[:] = rng.random(5) + 0.5
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    bn.eval()
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    y = bn(x)
    assert_accurate(y, lambda dt: reference.batch_norm(x, mean, var, bn.weight, bn.bias, training=False,
                                                       eps=1e-3, dtype=dt), dtype)
    np.testing.assert_array_equal(bn.running_mean, mean)   # eval changes nothing
    np.testing.assert_array_equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 0
    # in eval a sample's result does not depend on the rest of the batch
    np.testing.assert_array_equal(bn(x[:1])[0], y[0])


def test_batch_norm_momentum_none_is_a_cumulative_average(rng):
    bn = nn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((6, 3, 4)) * (k + 1) + k for k in range(5)]
    for k, x in enumerate(batches, 1):
        bn(x)
        means = [b.mean(axis=(0, 2)) for b in batches[:k]]
        variances = [b.var(axis=(0, 2), ddof=1) for b in batches[:k]]
        np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-12)
        assert int(bn.num_batches_tracked) == k


@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6)], ids=["NC", "NCL"])
def test_batch_norm_without_running_stats(shape, rng):
    bn = nn.BatchNorm1d(5, track_running_stats=False, dtype=np.float64)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    x = rng.standard_normal(shape) * 3 + 1
    train = bn(x)
    bn.eval()
    evaluated = bn(x)   # still the batch's statistics: there are no others
    np.testing.assert_array_equal(train, evaluated)
    assert_accurate(evaluated, lambda dt: reference.batch_norm(x, weight=bn.weight, bias=bn.bias,
                                                               training=True, dtype=dt), np.float64)


def test_batch_norm_errors():
    bn = nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(np.ones((1, 4), np.float32))
    assert int(bn.num_batches_tracked) == 0           # a refused batch is not counted
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, L\)"):
        bn(np.ones((2, 4, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"C = 4 on axis 1, got \(3, 5\)"):
        bn(np.ones((3, 5), np.float32))


def test_dropout_train_and_eval(rng):
    x = rng.standard_normal((200, 500)).astype(np.float32)
    drop = nn.Dropout(0.3, rng=np.random.default_rng(7))
    y = drop(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01, kept.mean()
    np.testing.assert_array_equal(y[kept], x[kept] * np.float32(1 / 0.7))   # scaled by 1/(1-p)
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    drop.train()
    assert np.any(drop(x) == 0)


def test_dropout_seeded_reproducibility(rng):
    x = rng.standard_normal((50, 40))
    a = nn.Dropout(0.5, rng=np.random.default_rng(3))(x)
    b = nn.Dropout(0.5, rng=np.random.default_rng(3))(x)
    c = nn.Dropout(0.5, rng=np.random.default_rng(4))(x)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    d = nn.Dropout(0.5, rng=np.random.default_rng(3))
    assert not np.array_equal(d(x), d(x))   # the generator moves on between calls


def test_dropout_p_zero_and_one(rng):
    x = rng.standard_normal((30, 30)).astype(np.float32)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x), x)
    y = nn.Dropout(1.0)(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, 0)
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(-0.1)


def test_embedding_lookup_and_padding(rng):
    emb = nn.Embedding(10, 4, padding_idx=-1, rng=rng)
    assert emb.padding_idx == 9
    np.testing.assert_array_equal(emb.weight[9], 0)
    idx = np.array([[0, 3, 9], [9, 2, 2]])
    out = emb(idx)
    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out, emb.weight[idx])
    np.testing.assert_array_equal(out[0, 2], 0)
    np.testing.assert_array_equal(emb(np.array(3)), emb.weight[3])
    assert emb(np.zeros((0,), np.int64)).shape == (0, 4)
    np.testing.assert_array_equal(emb(np.array([5], np.uint8)), emb.weight[[5]])


def test_embedding_bad_indices(rng):
    emb = nn.Embedding(10, 4, rng=rng)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        emb(np.array([1, 10]))
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        emb(np.array([-1, 2]))
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([True, False]))
    with pytest.raises(ValueError, match="padding_idx"):
        nn.Embedding(10, 4, padding_idx=10)


# ---------------------------------------------------------------------------
# Against torch.nn with the same weights

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_pytorch(dtype, bias, rng):
    torch = torch_or_skip()
    tm = torch.nn.Linear(24, 10, bias=bias, dtype=torch_dtype(torch, dtype))
    m = nn.Linear(24, 10, bias=bias, dtype=dtype)
    m.load_state_dict(torch_state(tm))
    x = rng.standard_normal((3, 7, 24)).astype(dtype)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    assert_close_to_torch(m(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LayerNorm", "LayerNorm_nobias", "RMSNorm"])
def test_norms_match_pytorch(simd, dtype, kind, rng):
    torch = torch_or_skip()
    td = torch_dtype(torch, dtype)
    if kind == "RMSNorm":
        tm, m = torch.nn.RMSNorm(16, dtype=td), nn.RMSNorm(16, dtype=dtype)
    else:
        bias = kind == "LayerNorm"
        tm, m = torch.nn.LayerNorm(16, bias=bias, dtype=td), nn.LayerNorm(16, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    m.load_state_dict(torch_state(tm))
    x = (rng.standard_normal((3, 5, 16)) * 3 + 1).astype(dtype)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    assert_close_to_torch(m(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6)], ids=["NC", "NCL"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batch_norm_matches_pytorch(dtype, shape, momentum, rng):
    torch = torch_or_skip()
    tm = torch.nn.BatchNorm1d(5, momentum=momentum, dtype=torch_dtype(torch, dtype))
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(rng.random(5) + 0.5))
        tm.bias.copy_(torch.from_numpy(rng.standard_normal(5)))
    m = nn.BatchNorm1d(5, momentum=momentum, dtype=dtype)
    m.load_state_dict(torch_state(tm))
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        with torch.no_grad():
            expected = tm(torch.from_numpy(x)).numpy()
        assert_close_to_torch(m(x), expected, dtype)
        assert_close_to_torch(m.running_mean, tm.running_mean.numpy(), dtype)
        assert_close_to_torch(m.running_var, tm.running_var.numpy(), dtype)
        assert int(m.num_batches_tracked) == int(tm.num_batches_tracked)
    m.eval()
    tm.eval()
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    assert_close_to_torch(m(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_without_running_stats_matches_pytorch(dtype, rng):
    torch = torch_or_skip()
    tm = torch.nn.BatchNorm1d(5, track_running_stats=False, dtype=torch_dtype(torch, dtype)).eval()
    m = nn.BatchNorm1d(5, track_running_stats=False, dtype=dtype).eval()
    m.load_state_dict(torch_state(tm))
    x = (rng.standard_normal((6, 5, 3)) * 2 + 1).astype(dtype)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    assert_close_to_torch(m(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_matches_pytorch(dtype, rng):
    torch = torch_or_skip()
    tm = torch.nn.Embedding(12, 5, padding_idx=4, dtype=torch_dtype(torch, dtype))
    m = nn.Embedding(12, 5, padding_idx=4, dtype=dtype)
    m.load_state_dict(torch_state(tm))
    idx = rng.integers(0, 12, (3, 7))
    with torch.no_grad():
        expected = tm(torch.from_numpy(idx)).numpy()
    np.testing.assert_array_equal(m(idx), expected)
    assert m(idx).dtype == dtype


TORCH_ACTIVATIONS = {
    "ReLU": (lambda: nn.ReLU(), lambda t: t.nn.ReLU()),
    "GELU": (lambda: nn.GELU(), lambda t: t.nn.GELU()),
    "GELU_tanh": (lambda: nn.GELU("tanh"), lambda t: t.nn.GELU(approximate="tanh")),
    "SiLU": (lambda: nn.SiLU(), lambda t: t.nn.SiLU()),
    "Sigmoid": (lambda: nn.Sigmoid(), lambda t: t.nn.Sigmoid()),
    "Tanh": (lambda: nn.Tanh(), lambda t: t.nn.Tanh()),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TORCH_ACTIVATIONS))
def test_activation_matches_pytorch(simd, dtype, name, rng):
    torch = torch_or_skip()
    make, make_torch = TORCH_ACTIVATIONS[name]
    x = activation_inputs(rng, dtype)
    with torch.no_grad():
        expected = make_torch(torch)(torch.from_numpy(x)).numpy()
    assert_close_to_torch(make()(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_in_eval_matches_pytorch(dtype, rng):
    torch = torch_or_skip()
    x = rng.standard_normal((4, 6)).astype(dtype)
    expected = torch.nn.Dropout(0.4).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(nn.Dropout(0.4).eval()(x), expected)


# ---------------------------------------------------------------------------
# The Module API

STATE_DICT_CASES = {
    "Linear": (lambda: nn.Linear(4, 3), lambda t: t.nn.Linear(4, 3)),
    "Linear_nobias": (lambda: nn.Linear(4, 3, bias=False), lambda t: t.nn.Linear(4, 3, bias=False)),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda t: t.nn.LayerNorm(4)),
    "LayerNorm_nobias": (lambda: nn.LayerNorm(4, bias=False), lambda t: t.nn.LayerNorm(4, bias=False)),
    "LayerNorm_noaffine": (lambda: nn.LayerNorm(4, elementwise_affine=False),
                           lambda t: t.nn.LayerNorm(4, elementwise_affine=False)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(4), lambda t: t.nn.BatchNorm1d(4)),
    "BatchNorm1d_noaffine": (lambda: nn.BatchNorm1d(4, affine=False),
                             lambda t: t.nn.BatchNorm1d(4, affine=False)),
    "BatchNorm1d_nostats": (lambda: nn.BatchNorm1d(4, track_running_stats=False),
                            lambda t: t.nn.BatchNorm1d(4, track_running_stats=False)),
    "Embedding": (lambda: nn.Embedding(6, 4), lambda t: t.nn.Embedding(6, 4)),
    "Sequential": (lambda: nn.Sequential([nn.Linear(4, 5), nn.ReLU(), nn.LayerNorm(5)]),
                   lambda t: t.nn.Sequential(t.nn.Linear(4, 5), t.nn.ReLU(), t.nn.LayerNorm(5))),
}


@pytest.mark.parametrize("name", list(STATE_DICT_CASES))
def test_state_dict_keys_and_shapes_match_pytorch(name):
    torch = torch_or_skip()
    make, make_torch = STATE_DICT_CASES[name]
    ours, theirs = make(), make_torch(torch)
    t = torch_state(theirs)
    assert list(ours.state_dict()) == list(t)
    for key, value in ours.state_dict().items():
        assert value.shape == t[key].shape, key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_transformer_layer_parameter_names_match_pytorch():
    torch = torch_or_skip()
    ours = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_parameter("scale", np.ones(3, np.float32))
        self.proj = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("steps", np.zeros((), np.int64))

    def forward(self, x):
        return self.drop(self.norm(self.proj(x * self.scale)))


def test_named_parameters_order_and_names():
    block = Block()
    names = [n for n, _ in block.named_parameters()]
    assert names == ["scale", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    assert [id(v) for v in block.parameters()] == [id(v) for _, v in block.named_parameters()]
    assert block.parameters()[1] is block.proj.weight
    assert list(block.state_dict()) == names[:1] + ["steps"] + names[1:]
    assert [n for n, _ in block.named_buffers()] == ["steps"]
    assert [n for n, _ in block.named_modules()] == ["", "proj", "norm", "drop"]
    assert block.state_dict()["proj.weight"] is block.proj.weight   # not a copy


def test_sequential_and_module_list_keys(rng):
    seq = nn.Sequential([nn.Linear(3, 4, rng=rng), nn.ReLU(), nn.Linear(4, 2, bias=False, rng=rng)])
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight"]
    assert len(seq) == 3 and seq[0] is list(seq)[0] and isinstance(seq[1], nn.ReLU)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(seq(x), seq[2](seq[1](seq[0](x))))
    ml = nn.ModuleList([nn.LayerNorm(2)]).append(nn.Linear(2, 2, rng=rng))
    assert list(ml.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    outer = nn.ModuleList([seq, ml])
    assert list(outer.state_dict())[:3] == ["0.0.weight", "0.0.bias", "0.2.weight"]
    assert list(outer.state_dict())[3] == "1.0.weight"


def test_load_state_dict_copies_in_place(rng):
    lin = nn.Linear(3, 2, rng=rng)
    held = lin.weight
    new = {"weight": rng.standard_normal((2, 3)), "bias": np.arange(2)}
    assert lin.load_state_dict(new) == ([], [])
    assert lin.weight is held and held.dtype == np.float32
    np.testing.assert_array_equal(held, new["weight"].astype(np.float32))
    np.testing.assert_array_equal(lin.bias, [0, 1])


def test_load_state_dict_errors(rng):
    lin = nn.Linear(3, 2, rng=rng)
    good = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    with pytest.raises(KeyError, match="missing keys: bias"):
        lin.load_state_dict({"weight": good["weight"]})
    with pytest.raises(KeyError, match="unexpected keys: extra, more"):
        lin.load_state_dict({**good, "extra": np.zeros(1), "more": np.zeros(1)})
    with pytest.raises(KeyError, match=r"missing keys: weight.*unexpected keys: wieght"):
        lin.load_state_dict({"wieght": good["weight"], "bias": good["bias"]})
    with pytest.raises(ValueError, match=r"'weight'.*\(3, 2\).*\(2, 3\)"):
        lin.load_state_dict({"weight": np.zeros((3, 2)), "bias": good["bias"]})
    before = lin.weight.copy()
    missing, unexpected = lin.load_state_dict({"bias": np.ones(2), "extra": 1}, strict=False)
    assert missing == ["weight"] and unexpected == ["extra"]
    np.testing.assert_array_equal(lin.weight, before)
    np.testing.assert_array_equal(lin.bias, 1)
    with pytest.raises(ValueError, match="'bias'"):   # a wrong shape is an error even when not strict
        lin.load_state_dict({"bias": np.ones(3)}, strict=False)


def test_assigning_a_parameter_of_the_wrong_shape(rng):
    lin = nn.Linear(3, 2, rng=rng)
    with pytest.raises(ValueError, match=r"weight.*\(2, 3\).*\(3, 2\)"):
        lin.weight = np.zeros((3, 2))
    lin.weight = np.ones((2, 3), np.float64)
    assert lin.weight.dtype == np.float32 and lin.state_dict()["weight"] is lin.weight
    np.testing.assert_array_equal(lin(np.ones((1, 3), np.float32)), 3 + lin.bias[None])


def test_num_parameters_and_freezing(rng):
    block = Block()
    total = 3 + 2 * 3 + 2 + 2 + 2
    assert block.num_parameters() == total                   # the buffer is not counted
    assert block.num_parameters(trainable_only=True) == total
    assert block.freeze("proj") is block                     # a prefix
    assert block.num_parameters(trainable_only=True) == total - 8
    assert [n for n, _ in block.trainable_parameters()] == ["scale", "norm.weight", "norm.bias"]
    block.freeze("norm.bias")
    assert block.num_parameters(trainable_only=True) == total - 10
    block.unfreeze("proj.weight")
    assert block.num_parameters(trainable_only=True) == total - 4
    block.freeze()
    assert block.num_parameters(trainable_only=True) == 0
    assert block.num_parameters() == total
    block.unfreeze()
    assert block.num_parameters(trainable_only=True) == total
    with pytest.raises(KeyError, match="'nope'"):
        block.freeze("nope")
    with pytest.raises(KeyError, match="'pro'"):   # a prefix is a whole dotted name part
        block.freeze("pro")


def test_astype_converts_everything_floating(rng):
    block = Block()
    bn = nn.BatchNorm1d(3)
    seq = nn.Sequential([block, bn])
    assert seq.astype(np.float64) is seq
    for name, value in seq.state_dict().items():
        expected = np.int64 if name.endswith(("steps", "num_batches_tracked")) else np.float64
        assert value.dtype == expected, name
    assert block.proj.weight.dtype == np.float64 and block.dtype == np.float64
    assert block.proj(np.ones((1, 3))).dtype == np.float64
    assert bn.running_var.dtype == np.float64
    with pytest.raises(TypeError, match="float16"):
        seq.astype(np.float16)


def test_train_and_eval_propagate():
    block = Block()
    seq = nn.Sequential([block, nn.Dropout(0.2)])
    assert seq.eval() is seq
    assert all(not m.training for _, m in seq.named_modules())
    assert not block.drop.training
    seq.train()
    assert all(m.training for _, m in seq.named_modules())
    seq.train(False)
    assert not block.norm.training
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(block(x), block(x))   # dropout is off in eval


# ---------------------------------------------------------------------------
# TOPICS #19: layer norm against batch norm, on a batch of one and on
# sequences of different lengths

def test_layer_norm_vs_batch_norm_batch_of_one_and_variable_lengths(rng):
    C = 6
    ln = nn.LayerNorm(C)
    bn = nn.BatchNorm1d(C)                                      # training mode
    batch = (rng.standard_normal((5, C)) * 3 + 2).astype(np.float32)
    other = batch.copy()
    other[1:] = (rng.standard_normal((4, C)) * 10 - 7).astype(np.float32)   # same sample 0

    # Layer norm: each sample normalised over its own features, so sample 0's
    # result is the same alone, in this batch or in another one.
    alone = ln(batch[:1])[0]
    np.testing.assert_array_equal(ln(batch)[0], alone)
    np.testing.assert_array_equal(ln(other)[0], alone)
    np.testing.assert_allclose(ln(batch).mean(axis=1), 0, atol=1e-5)   # per sample
    np.testing.assert_allclose(ln(batch).std(axis=1), 1, atol=1e-3)

    # Batch norm in training: each feature normalised over the batch, so
    # sample 0's result depends on the other samples...
    y_batch, y_other = bn(batch), bn(other)
    assert np.max(np.abs(y_batch[0] - y_other[0])) > 0.1
    np.testing.assert_allclose(y_batch.mean(axis=0), 0, atol=1e-5)    # per feature
    assert np.max(np.abs(y_batch.mean(axis=1))) > 0.1                  # not per sample
    # ...and a batch of one has no statistics to speak of.
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(batch[:1])

    # Variable lengths: a sequence of 3 tokens padded to 7 with zeros.
    seq = (rng.standard_normal((3, C)) * 2 + 1).astype(np.float32)     # (L, C)
    padded = np.zeros((7, C), np.float32)
    padded[:3] = seq
    # layer norm works token by token: padding leaves the real tokens alone
    np.testing.assert_array_equal(ln(padded[None])[0, :3], ln(seq[None])[0])
    # batch norm pools the statistics over batch and length: the padding
    # changes the real tokens' results
    bn_real = bn(np.ascontiguousarray(seq.T[None]))[0].T              # (1, C, 3) -> (3, C)
    bn_padded = bn(np.ascontiguousarray(padded.T[None]))[0].T[:3]     # (1, C, 7) -> first 3
    assert np.max(np.abs(bn_real - bn_padded)) > 0.1
    # and a longer neighbour in the batch changes them too
    longer = np.zeros((2, C, 7), np.float32)
    longer[0] = padded.T
    longer[1] = (rng.standard_normal((C, 7)) * 5).astype(np.float32)
    assert np.max(np.abs(bn(longer)[0].T[:3] - bn_padded)) > 0.1

    # In eval, batch norm uses its running statistics and no longer depends on
    # the batch (which is why it has to have them): then it is per sample too.
    bn.eval()
    np.testing.assert_array_equal(bn(batch)[0], bn(batch[:1])[0])
    np.testing.assert_array_equal(bn(other)[0], bn(batch[:1])[0])


# ---------------------------------------------------------------------------
# An empty batch, every module: an empty result of the shape a batch of two
# has, with the batch dimension 0 (as PyTorch gives); no error, no NaN

def _seq(*shape):
    return lambda n: (np.random.default_rng(n).standard_normal(
        tuple(n if d is None else d for d in shape)).astype(np.float32),)


_gen = np.random.default_rng
EMPTY_BATCH = [      # (class, build, make_inputs(n), the batch axis of each output)
    (nn.Module, lambda: nn.Sequential([]), _seq(None, 5, 8), (0,)),          # no layers: the identity
    # losses, per element (reduction "none") and the gradient
    (nn.CrossEntropyLoss, lambda: nn.CrossEntropyLoss(reduction="none"),
     lambda n: (_seq(None, 4)(n)[0], np.zeros(n, np.int64)), (0,)),
    (nn.BCEWithLogitsLoss, lambda: nn.BCEWithLogitsLoss(reduction="none"),
     lambda n: _seq(None, 4)(n) * 2, (0,)),
    (nn.MSELoss, lambda: nn.MSELoss(reduction="none"), lambda n: _seq(None, 4)(n) * 2, (0,)),
    (nn.Linear, lambda: nn.Linear(8, 3, rng=_gen(0)), _seq(None, 5, 8), (0,)),
    (nn.LayerNorm, lambda: nn.LayerNorm(8), _seq(None, 5, 8), (0,)),
    (nn.RMSNorm, lambda: nn.RMSNorm(8), _seq(None, 5, 8), (0,)),
    (nn.BatchNorm1d, lambda: nn.BatchNorm1d(8), _seq(None, 8), (0,)),
    (nn.BatchNorm1d, lambda: nn.BatchNorm1d(8, track_running_stats=False), _seq(None, 8, 4), (0,)),
    (nn.BatchNorm1d, lambda: nn.BatchNorm1d(8).eval(), _seq(None, 8, 4), (0,)),
    (nn.Dropout, lambda: nn.Dropout(0.5, rng=_gen(0)), _seq(None, 5, 8), (0,)),
    (nn.Embedding, lambda: nn.Embedding(10, 4, rng=_gen(0)),
     lambda n: (np.arange(n * 5).reshape(n, 5) % 10,), (0,)),
    (nn.Identity, nn.Identity, _seq(None, 5, 8), (0,)),
    (nn.ReLU, nn.ReLU, _seq(None, 5, 8), (0,)),
    (nn.GELU, lambda: nn.GELU("tanh"), _seq(None, 5, 8), (0,)),
    (nn.SiLU, nn.SiLU, _seq(None, 5, 8), (0,)),
    (nn.Sigmoid, nn.Sigmoid, _seq(None, 5, 8), (0,)),
    (nn.Tanh, nn.Tanh, _seq(None, 5, 8), (0,)),
    (nn.Sequential, lambda: nn.Sequential([nn.Linear(8, 4, rng=_gen(0)), nn.ReLU()]), _seq(None, 5, 8), (0,)),
    (nn.ModuleList, lambda: nn.ModuleList([nn.Linear(8, 8, rng=_gen(0)), nn.LayerNorm(8)]),
     _seq(None, 5, 8), (0, 0)),
    (nn.MultiHeadAttention, lambda: nn.MultiHeadAttention(8, 2, rng=_gen(0)),
     lambda n: _seq(5, None, 8)(n) * 3, (1, 0)),
    (nn.MultiHeadAttention, lambda: nn.MultiHeadAttention(8, 2, kdim=6, vdim=4, num_kv_heads=1,
                                                          add_bias_kv=True, batch_first=True, rng=_gen(0)),
     lambda n: _seq(n, 5, 8)(n) + _seq(n, 7, 6)(n) + _seq(n, 7, 4)(n), (0, 0)),
    (nn.KVCache, nn.KVCache,
     lambda n: _seq(None, 2, 3, 4)(n) * 2, (0, 0)),
    (nn.Attention, lambda: nn.Attention(8, score="additive", rng=_gen(0)),
     lambda n: _seq(None, 5, 8)(n) * 3, (0, 0)),
    (nn.SinusoidalPositionalEncoding, lambda: nn.SinusoidalPositionalEncoding(8), _seq(None, 5, 8), (0,)),
    (nn.LearnedPositionalEmbedding, lambda: nn.LearnedPositionalEmbedding(10, 8, rng=_gen(0)),
     _seq(None, 5, 8), (0,)),
    (nn.RotaryEmbedding, lambda: nn.RotaryEmbedding(8), _seq(None, 2, 5, 8), (0,)),
    (nn.TransformerEncoderLayer, lambda: nn.TransformerEncoderLayer(8, 2, 16, rng=_gen(0)),
     _seq(5, None, 8), (1,)),
    (nn.TransformerDecoderLayer, lambda: nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, rng=_gen(0)),
     lambda n: _seq(n, 4, 8)(n) + _seq(n, 6, 8)(n), (0,)),
    (nn.TransformerEncoder, lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, rng=_gen(0)), 2, norm=nn.LayerNorm(8)),
     _seq(None, 5, 8), (0,)),
    (nn.TransformerDecoder, lambda: nn.TransformerDecoder(
        nn.TransformerDecoderLayer(8, 2, 16, rng=_gen(0)), 2),
     lambda n: _seq(4, n, 8)(n) + _seq(6, n, 8)(n), (1,)),
]


def _call(module, inputs):
    if isinstance(module, nn.KVCache):
        return module.append(*inputs)
    if type(module) is nn.ModuleList:          # no forward of its own: each member's
        return tuple(member(*inputs) for member in module)
    return module(*inputs)


@pytest.mark.parametrize("cls, build, make_inputs, batch_axes", EMPTY_BATCH,
                         ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(EMPTY_BATCH)])
def test_every_module_takes_an_empty_batch(cls, build, make_inputs, batch_axes):
    module = build()
    assert isinstance(module, cls)
    two = _call(build(), make_inputs(2))
    empty = _call(module, make_inputs(0))
    two, empty = (two, empty) if isinstance(two, tuple) else ((two,), (empty,))
    assert len(empty) == len(two) == len(batch_axes)
    for got, full, axis in zip(empty, two, batch_axes):
        expected_shape = list(full.shape)
        expected_shape[axis] = 0
        assert got.shape == tuple(expected_shape) and got.dtype == full.dtype


def test_every_public_module_class_has_an_empty_batch_case():
    covered = {case[0] for case in EMPTY_BATCH}
    missing = [name for name in nn.__all__ if isinstance(getattr(nn, name), type)
               and getattr(nn, name) not in covered]
    assert not missing, f"add EMPTY_BATCH cases for: {', '.join(missing)}"


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (4, 5, 0)], ids=["0C", "0CL", "NC0"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_empty_batch_in_training_matches_pytorch(shape, momentum, rng):
    # PyTorch returns an empty batch empty, leaves the running statistics as
    # they were, and counts the batch in num_batches_tracked.
    torch = torch_or_skip()
    t = torch.nn.BatchNorm1d(5, momentum=momentum)
    a = nn.BatchNorm1d(5, momentum=momentum)
    warm = rng.standard_normal((6, 5)).astype(np.float32)
    t(torch.from_numpy(warm))
    a(warm)
    with torch.no_grad():
        t.weight.normal_()
    a.load_state_dict(torch_state(t))
    x = np.zeros(shape, np.float32)
    expected = t(torch.from_numpy(x)).detach().numpy()
    out = a(x)
    assert out.shape == expected.shape == shape and out.dtype == np.float32
    for name, value in torch_state(t).items():
        np.testing.assert_array_equal(a.state_dict()[name], value, err_msg=name)
    assert int(a.num_batches_tracked) == 2
    with pytest.raises(ValueError, match=r"C = 5 on axis 1, got \(0, 4\)"):
        a(np.zeros((0, 4), np.float32))        # the wrong channels stay an error when empty
    untracked = nn.BatchNorm1d(5, track_running_stats=False, affine=False)
    assert untracked(x).shape == shape


# ---------------------------------------------------------------------------
# BatchNorm1d: (N, L, C) input (channels_last=True) and padding masks

def _bn(C, dtype=np.float64, rng=None, **kwargs):
    bn = nn.BatchNorm1d(C, dtype=dtype, **kwargs)
    if rng is not None and bn.weight is not None:
        bn.weight[:] = rng.random(C) + 0.5
        bn.bias[:] = rng.standard_normal(C)
    return bn


def _padding(N, L, rng):
    """A (N, L) padding mask (True = padded): each sequence a random length >= 1."""
    lengths = rng.integers(1, L + 1, N)
    lengths[0] = L
    return np.arange(L)[None, :] >= lengths[:, None]


def _numpy_masked_bn(x, mask, weight, bias, eps):
    """(N, L, C) x normalised by the mean and biased variance of its kept positions."""
    kept = x[~mask].astype(np.float64)                      # (n, C)
    mean, var = kept.mean(axis=0), kept.var(axis=0)
    return (x - mean) / np.sqrt(var + eps) * weight + bias, mean, kept.var(axis=0, ddof=1)


def _central_differences(f, x, h=1e-6):
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        out[i] = (f(xp) - f(xm)) / (2 * h)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_channels_last_is_the_transpose(dtype, rng):
    first, last = _bn(5, dtype, np.random.default_rng(1)), _bn(5, dtype, np.random.default_rng(1),
                                                                 channels_last=True)
    for _ in range(2):
        x = (rng.standard_normal((4, 6, 5)) * 2 + 1).astype(dtype)          # (N, L, C)
        y = last(x)
        assert y.shape == x.shape and y.dtype == dtype
        np.testing.assert_array_equal(y, first(x.transpose(0, 2, 1)).transpose(0, 2, 1))
        np.testing.assert_array_equal(last.running_mean, first.running_mean)
        np.testing.assert_array_equal(last.running_var, first.running_var)
    x2 = rng.standard_normal((7, 5)).astype(dtype)                       # (N, C): the same in both
    np.testing.assert_array_equal(last(x2), first(x2))
    last.eval(), first.eval()
    np.testing.assert_array_equal(last(x), first(x.transpose(0, 2, 1)).transpose(0, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_norm_padding_mask_matches_numpy_over_kept_positions(dtype, channels_last, rng):
    N, L, C = 5, 7, 4
    bn = _bn(C, dtype, rng, channels_last=channels_last)
    mean_ref, var_ref = np.zeros(C), np.ones(C)
    for step in range(3):
        x = (rng.standard_normal((N, L, C)) * 3 + 2).astype(dtype)
        mask = _padding(N, L, rng)
        x[mask] = 1e3                                   # padding values must not matter
        y = bn(x if channels_last else x.transpose(0, 2, 1), padding_mask=mask)
        y = y if channels_last else y.transpose(0, 2, 1)
        expected, mean, unbiased = _numpy_masked_bn(x, mask, bn.weight, bn.bias, bn.eps)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(y[~mask], expected[~mask], rtol=tol, atol=tol)
        # padded positions: normalised with the same statistics
        np.testing.assert_allclose(y[mask], expected[mask], rtol=tol, atol=tol * 1e3)
        mean_ref = 0.9 * mean_ref + 0.1 * mean
        var_ref = 0.9 * var_ref + 0.1 * unbiased
        np.testing.assert_allclose(bn.running_mean, mean_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_var, var_ref, rtol=tol, atol=tol)
        assert int(bn.num_batches_tracked) == step + 1


def test_batch_norm_mask_of_nothing_padded_changes_nothing(rng):
    x = rng.standard_normal((4, 6, 3))
    a, b = _bn(3, rng=np.random.default_rng(2), channels_last=True), _bn(3, rng=np.random.default_rng(2),
                                                                          channels_last=True)
    np.testing.assert_allclose(a(x, padding_mask=np.zeros((4, 6), bool)), b(x), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-13)
    g = rng.standard_normal(x.shape)
    np.testing.assert_allclose(a.backward(g), b.backward(g), rtol=1e-10, atol=1e-12)


def test_batch_norm_padding_mask_on_two_dimensional_input(rng):
    x = rng.standard_normal((6, 3))
    mask = np.array([False, False, True, False, True, False])
    bn = _bn(3, rng=rng)
    y = bn(x, padding_mask=mask)
    kept = x[~mask]
    np.testing.assert_allclose(y, (x - kept.mean(0)) / np.sqrt(kept.var(0) + 1e-5) * bn.weight + bn.bias,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True,
                                            padding_mask=mask), y, rtol=1e-14, atol=1e-14)


def test_batch_norm_eval_accepts_the_mask_and_ignores_it(rng):
    bn = _bn(4, rng=rng, channels_last=True)
    bn(rng.standard_normal((3, 5, 4)))
    bn.eval()
    x = rng.standard_normal((3, 5, 4))
    mask = _padding(3, 5, rng)
    before = bn.running_mean.copy(), bn.running_var.copy()
    np.testing.assert_array_equal(bn(x, padding_mask=mask), bn(x))
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(3, 5\)"):
        bn(x, padding_mask=np.zeros((3, 4), bool))          # still checked


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_batch_norm_backward_matches_central_differences(channels_last, affine, masked, rng):
    N, L, C = 3, 4, 3
    bn = _bn(C, rng=rng, affine=affine, channels_last=channels_last)
    x = rng.standard_normal((N, L, C) if channels_last else (N, C, L)) * 2 + 1
    mask = _padding(N, L, rng) if masked else None
    if masked:
        mask[1, 1:] = True                              # something padded, for certain
    g = rng.standard_normal(x.shape)

    def loss(xx, **params):
        m = _bn(C, affine=affine, channels_last=channels_last)
        if affine:
            m.weight[:] = params.get("weight", bn.weight)
            m.bias[:] = params.get("bias", bn.bias)
        return float((m(xx, padding_mask=mask) * g).sum())

    bn.zero_grad()
    bn(x, padding_mask=mask)
    dx = bn.backward(g)
    np.testing.assert_allclose(dx, _central_differences(loss, x), rtol=1e-6, atol=1e-7)
    if affine:
        for name in ("weight", "bias"):
            value = getattr(bn, name).copy()
            numeric = _central_differences(lambda v: loss(x, **{name: v}), value)
            np.testing.assert_allclose(bn.grads()[name], numeric, rtol=1e-6, atol=1e-7)


def test_batch_norm_masked_gradient_of_kept_positions_is_torch_on_the_kept_ones(rng):
    """With no gradient arriving at padded outputs, the layer is PyTorch's
    BatchNorm1d on the kept positions alone, packed as (n, C); padded inputs
    then get no gradient."""
    torch = torch_or_skip()
    N, L, C = 4, 6, 5
    bn = _bn(C, rng=rng, channels_last=True)
    x = rng.standard_normal((N, L, C)) * 2 + 1
    mask = _padding(N, L, rng)
    y = bn(x, padding_mask=mask)
    g = rng.standard_normal(x.shape)
    g[mask] = 0
    dx = bn.backward(g)
    tm = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(bn.weight))
        tm.bias.copy_(torch.from_numpy(bn.bias))
    kept = torch.from_numpy(x[~mask]).requires_grad_(True)
    out = tm(kept)
    out.backward(torch.from_numpy(g[~mask]))
    np.testing.assert_allclose(y[~mask], out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx[~mask], kept.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(dx[mask], 0)
    np.testing.assert_allclose(bn.running_var, tm.running_var.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.grads()["weight"], tm.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_channels_last_backward_matches_pytorch_on_the_transpose(dtype, affine):
    from gradients import check_module
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    ours = nn.BatchNorm1d(5, affine=affine, channels_last=True, dtype=dtype)
    for _, p in ours.named_parameters():
        p[...] = rng.standard_normal(p.shape).astype(dtype)
    theirs = torch.nn.BatchNorm1d(5, affine=affine)
    x = (rng.standard_normal((3, 7, 5)) * 2 + 1).astype(dtype)             # (N, L, C)
    check_module(ours, theirs, [x], dtype,
                 torch_call=lambda m, t: m(t.transpose(1, 2)).transpose(1, 2))
    for name, value in ours.named_buffers():
        np.testing.assert_allclose(value, dict(theirs.named_buffers())[name].numpy(), rtol=1e-5)


def test_batch_norm_wrong_layout_says_what_it_wants():
    with pytest.raises(ValueError) as err:
        nn.BatchNorm1d(8)(np.zeros((4, 10, 8), np.float32))
    assert str(err.value) == ("BatchNorm1d(8) expects (N, C) or (N, C, L) with C = 8 on axis 1, "
                              "got (4, 10, 8); for (N, L, C) input pass channels_last=True")
    with pytest.raises(ValueError) as err:
        nn.BatchNorm1d(8, channels_last=True)(np.zeros((4, 8, 10), np.float32))
    assert str(err.value) == ("BatchNorm1d(8, channels_last=True) expects (N, C) or (N, L, C) with "
                              "C = 8 on the last axis, got (4, 8, 10); for (N, C, L) input use "
                              "channels_last=False (the default)")
    with pytest.raises(ValueError, match=r"got \(8,\); for \(N, L, C\)"):
        nn.BatchNorm1d(8)(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"C = 8 \(the size of running_mean\) on axis 1, got "
                                         r"shape \(4, 10, 8\)"):
        F.batch_norm(np.zeros((4, 10, 8)), np.zeros(8), np.ones(8), training=True)


def test_batch_norm_bad_padding_masks(rng):
    bn = nn.BatchNorm1d(3, channels_last=True, dtype=np.float64)
    x = rng.standard_normal((2, 4, 3))
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(2, 4\)"):
        bn(x, padding_mask=np.zeros((4, 2), bool))
    with pytest.raises(TypeError, match="bool"):
        bn(x, padding_mask=np.zeros((2, 4)))
    mask = np.ones((2, 4), bool)
    mask[0, 0] = False                                  # one kept value per channel: no variance
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(x, padding_mask=mask)
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        nn.BatchNorm1d(3, channels_last="yes")


def test_batch_norm_channels_last_repr_and_pickle(rng):
    import pickle
    bn = nn.BatchNorm1d(6, channels_last=True)
    assert repr(bn) == "BatchNorm1d(6, eps=1e-05, momentum=0.1, channels_last=True)"
    assert repr(nn.BatchNorm1d(6)) == "BatchNorm1d(6, eps=1e-05, momentum=0.1)"
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    bn(x)
    copy = pickle.loads(pickle.dumps(bn))
    assert copy.channels_last
    np.testing.assert_array_equal(copy.eval()(x), bn.eval()(x))


# ---------------------------------------------------------------------------
# printing a module shows its activation

def _top_line(module):
    return repr(module).split("\n")[0]


@pytest.mark.parametrize("cls", ["TransformerEncoderLayer", "TransformerDecoderLayer"])
@pytest.mark.parametrize("activation, shown", [("relu", "relu"), ("gelu", "gelu"),
                                               ("gelu_tanh", "gelu_tanh"), (F.silu, "silu"),
                                               (np.tanh, "tanh")])
def test_transformer_layer_repr_shows_its_activation(cls, activation, shown):
    layer = getattr(nn, cls)(8, 2, 16, activation=activation, norm_first=True, batch_first=True)
    assert _top_line(layer) == (f"{cls}(d_model=8, nhead=2, dim_feedforward=16, activation={shown}, "
                                "norm_first=True, batch_first=True")


def test_transformer_layer_with_a_module_activation_prints_it_as_a_child():
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=nn.GELU("tanh"))
    text = repr(layer)
    assert "(activation): GELU(approximate='tanh')" in text
    assert _top_line(layer) == ("TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, "
                                "norm_first=False, batch_first=False")
    assert repr(nn.GELU()) == "GELU(approximate='none')"


@pytest.mark.parametrize("hidden_act, shown", [("gelu", "gelu"), ("gelu_new", "gelu_tanh"),
                                               ("relu", "relu")])
def test_bert_layers_print_their_activation(hidden_act, shown):
    from attnkit.models.bert import BertConfig, BertModel
    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=16, hidden_act=hidden_act))
    assert repr(model).count(f"BertLayer(activation={shown}") == 2
