"""nn.CrossEntropyLoss, nn.BCEWithLogitsLoss and nn.MSELoss, and their
backward, against torch.nn's losses and autograd and float64 central
differences."""
import numpy as np
import pytest

from attnkit import nn
from accuracy import torch_or_skip

REDUCTIONS = ["mean", "sum", "none"]


def torch_loss(torch, name, x, target, kwargs, grad_output=None):
    """torch's loss and d loss / d input for the same arguments."""
    tx = torch.tensor(x, requires_grad=True)
    tkwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    tt = torch.tensor(target)
    loss = getattr(torch.nn, name)(**tkwargs)(tx, tt)
    loss.backward(torch.ones_like(loss) if grad_output is None else torch.tensor(grad_output))
    return loss.detach().numpy(), tx.grad.numpy()


def check_against_torch(name, x, target, kwargs, grad_output=None):
    torch = torch_or_skip()
    criterion = getattr(nn, name)(**kwargs)
    before = (x.copy(), np.array(target, copy=True))
    loss = criterion(x, target)
    grad = criterion.backward(grad_output)
    expected_loss, expected_grad = torch_loss(torch, name, x, target, kwargs, grad_output)
    tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss, expected_loss, **tol)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    np.testing.assert_allclose(grad, expected_grad, **tol)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(target, before[1])
    if kwargs.get("reduction", "mean") != "none":
        assert isinstance(loss, float)
    return loss, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "weight", "smoothing", "weight+smoothing", "ignore"])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (3, 4, 2, 3)])
def test_cross_entropy_with_class_indices(dtype, reduction, options, shape, rng):
    C = shape[0] if len(shape) == 1 else shape[1]
    rest = () if len(shape) == 1 else shape[:1] + shape[2:]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    target = rng.integers(0, C, rest)
    kwargs = {"reduction": reduction}
    if "weight" in options:
        kwargs["weight"] = rng.uniform(0.5, 2, C).astype(dtype)
    if "smoothing" in options:
        kwargs["label_smoothing"] = 0.15
    if options == "ignore" and rest:
        target.flat[::3] = 7
        kwargs["ignore_index"] = 7
    check_against_torch("CrossEntropyLoss", x, target, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "weight", "smoothing"])
def test_cross_entropy_with_probabilities(reduction, options, rng):
    x = rng.standard_normal((6, 5, 3))
    target = rng.dirichlet(np.ones(5), (6, 3)).transpose(0, 2, 1).copy()
    kwargs = {"reduction": reduction}
    if options == "weight":
        kwargs["weight"] = rng.uniform(0.5, 2, 5)
    if options == "smoothing":
        kwargs["label_smoothing"] = 0.2
    check_against_torch("CrossEntropyLoss", x, target, kwargs)


def test_cross_entropy_huge_logits_and_all_ignored(rng):
    x = np.array([[1e4, -1e4, 0.0], [-3e38, 3e38, 1.0]], np.float32)
    loss, grad = check_against_torch("CrossEntropyLoss", x, np.array([1, 1]), {})
    assert np.isfinite(loss) and np.isfinite(grad).all()
    criterion = nn.CrossEntropyLoss()
    loss = criterion(x, np.array([-100, -100]))   # nothing counted: the mean is 0/0, NaN as in PyTorch
    torch = torch_or_skip()
    assert np.isnan(loss) and np.isnan(torch_loss(torch, "CrossEntropyLoss", x, np.array([-100, -100]), {})[0])
    assert np.all(criterion.backward() == 0)     # and no element passes a gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "weight", "pos_weight", "both"])
def test_bce_with_logits(dtype, reduction, options, rng):
    x = (rng.standard_normal((8, 5)) * 4).astype(dtype)
    x[0, 0], x[0, 1] = 200, -200                      # far past where exp overflows in float32's naive form
    target = (rng.random((8, 5)) < 0.4).astype(dtype)
    target[1] = rng.random(5)                          # soft labels too
    kwargs = {"reduction": reduction}
    if options in ("weight", "both"):
        kwargs["weight"] = rng.uniform(0.5, 2, 5).astype(dtype)
    if options in ("pos_weight", "both"):
        kwargs["pos_weight"] = rng.uniform(0.5, 4, 5).astype(dtype)
    check_against_torch("BCEWithLogitsLoss", x, target, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse(reduction, rng):
    x, y = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2))
    check_against_torch("MSELoss", x, y, {"reduction": reduction})


def test_grad_output_scales_the_gradient(rng):
    x = rng.standard_normal((5, 4))
    target = rng.integers(0, 4, 5)
    check_against_torch("CrossEntropyLoss", x, target, {"reduction": "none"}, rng.standard_normal(5))
    check_against_torch("CrossEntropyLoss", x, target, {}, np.array(2.5))
    check_against_torch("BCEWithLogitsLoss", x, (x > 0).astype(float), {"reduction": "none"},
                        rng.standard_normal((5, 4)))


@pytest.mark.parametrize("name, make_target", [
    ("CrossEntropyLoss", lambda rng: rng.integers(0, 4, (3, 2))),
    ("CrossEntropyLoss", lambda rng: rng.dirichlet(np.ones(4), (3, 2)).transpose(0, 2, 1).copy()),
    ("BCEWithLogitsLoss", lambda rng: rng.random((3, 4, 2))),
    ("MSELoss", lambda rng: rng.standard_normal((3, 4, 2))),
])
def test_float64_central_differences(name, make_target, rng):
    x = rng.standard_normal((3, 4, 2))
    target = make_target(rng)
    kwargs = {"label_smoothing": 0.1, "weight": rng.uniform(0.5, 2, 4)} if name == "CrossEntropyLoss" else {}
    if name == "BCEWithLogitsLoss":
        kwargs = {"pos_weight": rng.uniform(0.5, 3, 2)}
    criterion = getattr(nn, name)(**kwargs)
    criterion(x, target)
    grad = criterion.backward()
    h = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (criterion(plus, target) - criterion(minus, target)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_errors_name_the_problem(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"class 3, outside \[0, 3\)"):
        nn.CrossEntropyLoss()(x, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        nn.CrossEntropyLoss()(x, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"probability target must have input's shape \(4, 3\)"):
        nn.CrossEntropyLoss()(x, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nn.CrossEntropyLoss(weight=np.ones(2))(x, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss(reduction="average")
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(TypeError, match="int32"):
        nn.MSELoss()(np.ones(3, np.int32), np.ones(3))
    with pytest.raises(ValueError, match=r"target must have input's shape"):
        nn.BCEWithLogitsLoss()(x, np.ones(3))
    with pytest.raises(ValueError, match=r"BCEWithLogitsLoss: weight of shape \(2,\) does not broadcast"):
        nn.BCEWithLogitsLoss(weight=np.ones(2))(x, np.ones((4, 3)))
    with pytest.raises(RuntimeError, match="call the loss on an input first"):
        nn.MSELoss().backward()
    criterion = nn.MSELoss(reduction="none")
    criterion(x, x)
    with pytest.raises(ValueError, match=r"grad_output has shape \(3,\), expected the loss's \(4, 3\)"):
        criterion.backward(np.ones(3))


def test_a_target_of_the_wrong_kind_is_named():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"class indices must be an integer array"):
        nn.CrossEntropyLoss()(x, np.array([0.0, 1.0, 2.0]))
    for criterion in (nn.BCEWithLogitsLoss(), nn.MSELoss()):
        with pytest.raises(TypeError, match=r"target must be numbers, got dtype <U1"):
            criterion(x, np.full((3, 4), "a"))
