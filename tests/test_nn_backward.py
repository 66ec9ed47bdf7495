"""Backward of the basic layers (attnkit.nn.layers), the Module machinery
(train/eval, grads, zero_grad, freeze) and Sequential, against
torch.autograd with the same weights (tests/gradients.py's rule)."""
import pickle

import numpy as np
import pytest

from attnkit import nn
from gradients import check_finite_differences, check_module
from accuracy import torch_or_skip
from threads import thread_count

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 5), (3, 7), (2, 3, 17)]


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, shape, bias):
    torch = torch_or_skip()
    rng = np.random.default_rng(1)
    ours = nn.Linear(shape[-1], 9, bias=bias, dtype=dtype, rng=rng)
    theirs = torch.nn.Linear(shape[-1], 9, bias=bias)
    check_module(ours, theirs, [randn(rng, shape, dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_layer_norm(dtype, shape, affine):
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    ours = nn.LayerNorm(shape[-1], elementwise_affine=affine[0], bias=affine[1], dtype=dtype)
    for _, p in ours.named_parameters():
        p[...] = randn(rng, p.shape, dtype)
    theirs = torch.nn.LayerNorm(shape[-1], elementwise_affine=affine[0], bias=affine[1])
    check_module(ours, theirs, [randn(rng, shape, dtype) + 3], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm(dtype, shape, affine):
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    ours = nn.RMSNorm(shape[-1], eps=1e-6, elementwise_affine=affine, dtype=dtype)
    for _, p in ours.named_parameters():
        p[...] = randn(rng, p.shape, dtype)
    theirs = torch.nn.RMSNorm(shape[-1], eps=1e-6, elementwise_affine=affine)
    check_module(ours, theirs, [randn(rng, shape, dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (7, 1, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_batch_norm(dtype, shape, affine, track):
    torch = torch_or_skip()
    rng = np.random.default_rng(4)
    ours = nn.BatchNorm1d(shape[1], affine=affine, track_running_stats=track, dtype=dtype)
    for _, p in ours.named_parameters():
        p[...] = randn(rng, p.shape, dtype)
    theirs = torch.nn.BatchNorm1d(shape[1], affine=affine, track_running_stats=track)
    check_module(ours, theirs, [randn(rng, shape, dtype) * 2 + 1], dtype)
    for name, value in ours.named_buffers():                 # running statistics as PyTorch's
        np.testing.assert_allclose(value, dict(theirs.named_buffers())[name].numpy(), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("module", ["ReLU", "GELU", "GELU_tanh", "SiLU", "Sigmoid", "Tanh", "Identity"])
def test_activations(dtype, module):
    torch = torch_or_skip()
    rng = np.random.default_rng(5)
    if module == "GELU_tanh":
        ours, theirs = nn.GELU("tanh"), torch.nn.GELU("tanh")
    else:
        ours, theirs = getattr(nn, module)(), getattr(torch.nn, module)()
    check_module(ours, theirs, [randn(rng, (3, 11), dtype) * 3], dtype)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_backward_uses_the_forwards_mask(p):
    rng = np.random.default_rng(6)
    drop = nn.Dropout(p, rng=np.random.default_rng(7))
    x = randn(rng, (5, 40), np.float64)
    y = drop(x)
    g = randn(rng, x.shape, np.float64)
    dx = drop.backward(g)
    kept = y != 0
    np.testing.assert_array_equal(dx[~kept], 0)
    np.testing.assert_allclose(dx[kept], g[kept] / (1 - p))
    # the same random stream as F.dropout's
    from attnkit import functional as F
    np.testing.assert_array_equal(y, F.dropout(x, p, rng=np.random.default_rng(7)))
    drop.eval()
    assert drop(x) is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_embedding(dtype, padding_idx):
    torch = torch_or_skip()
    rng = np.random.default_rng(8)
    ours = nn.Embedding(10, 6, padding_idx=padding_idx, dtype=dtype, rng=rng)
    theirs = torch.nn.Embedding(10, 6, padding_idx=padding_idx)
    indices = np.array([[0, 3, 3, 9], [3, 1, 0, 3]])          # repeated rows add up
    check_module(ours, theirs, [indices], dtype)


def test_sequential():
    torch = torch_or_skip()
    rng = np.random.default_rng(9)
    ours = nn.Sequential([nn.Linear(6, 8, dtype=np.float64, rng=rng), nn.GELU(),
                          nn.LayerNorm(8, dtype=np.float64), nn.Linear(8, 3, dtype=np.float64, rng=rng)])
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8),
                                 torch.nn.Linear(8, 3))
    check_module(ours, theirs, [randn(rng, (4, 6), np.float64)], np.float64)


def test_frozen_parameters_get_no_gradient():
    torch = torch_or_skip()
    rng = np.random.default_rng(10)
    ours = nn.Sequential([nn.Linear(6, 8, dtype=np.float64, rng=rng), nn.ReLU(),
                          nn.Linear(8, 3, dtype=np.float64, rng=rng)])
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    check_module(ours, theirs, [randn(rng, (4, 6), np.float64)], np.float64, frozen=("0.weight", "2.bias"))


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(11)
    lin = nn.Linear(5, 4, dtype=np.float64, rng=rng)
    x1, x2 = randn(rng, (3, 5), np.float64), randn(rng, (2, 5), np.float64)
    g1, g2 = randn(rng, (3, 4), np.float64), randn(rng, (2, 4), np.float64)
    lin(x1)
    lin.backward(g1)
    held = lin.grads()["weight"]
    lin(x2)
    lin.backward(g2)
    np.testing.assert_allclose(lin.grads()["weight"], g1.T @ x1 + g2.T @ x2, rtol=1e-12)
    np.testing.assert_allclose(lin.grads()["bias"], g1.sum(0) + g2.sum(0), rtol=1e-12)
    assert held is lin.grads()["weight"]                      # one array, added into
    lin.zero_grad()
    assert not any(g.any() for g in lin.grads().values())


def test_eval_mode_keeps_nothing_and_matches_training_forward():
    rng = np.random.default_rng(12)
    model = nn.Sequential([nn.Linear(6, 8, rng=rng), nn.GELU(), nn.LayerNorm(8), nn.RMSNorm(8)])
    x = randn(rng, (4, 6), np.float32)
    y_train = model(x)
    assert all(m._saved is not None for m in model)
    model.eval()
    assert all(m._saved is None for _, m in model.named_modules())
    np.testing.assert_array_equal(model(x), y_train)
    assert all(m._saved is None for _, m in model.named_modules())


def test_errors():
    rng = np.random.default_rng(13)
    lin = nn.Linear(5, 4, rng=rng)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        lin.backward(np.ones((3, 4), np.float32))
    lin.eval()
    lin(np.ones((3, 5), np.float32))
    with pytest.raises(RuntimeError, match="eval mode"):
        lin.backward(np.ones((3, 4), np.float32))
    lin.train()
    lin(np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"grad_output has shape \(3, 5\).*\(3, 4\)"):
        lin.backward(np.ones((3, 5), np.float32))
    with pytest.raises(TypeError):
        lin.backward(np.ones((3, 4), np.int64) == 1)
    emb = nn.Embedding(4, 2)
    emb(np.array([1, 2]))
    with pytest.raises(ValueError, match="grad_output has shape"):
        emb.backward(np.ones((3, 2), np.float32))


def test_gradients_are_bitwise_the_same_at_1_2_and_3_threads():
    rng = np.random.default_rng(14)
    model = nn.Sequential([nn.Linear(64, 96, rng=rng), nn.GELU(), nn.LayerNorm(96),
                           nn.Linear(96, 32, rng=rng)])
    x = randn(rng, (300, 64), np.float32)
    g = randn(rng, (300, 32), np.float32)
    results = []
    for threads in (1, 2, 3):
        with thread_count(threads):
            model.zero_grad()
            model(x)
            dx = model.backward(g)
            results.append((dx, {k: v.copy() for k, v in model.grads().items()}))
    for other in results[1:]:
        np.testing.assert_array_equal(results[0][0], other[0])
        for name in results[0][1]:
            np.testing.assert_array_equal(results[0][1][name], other[1][name])


def test_a_trained_module_pickles_with_its_gradients():
    rng = np.random.default_rng(15)
    lin = nn.Linear(3, 2, rng=rng)
    lin(np.ones((1, 3), np.float32))
    lin.backward(np.ones((1, 2), np.float32))
    clone = pickle.loads(pickle.dumps(lin))
    np.testing.assert_array_equal(clone.grads()["weight"], lin.grads()["weight"])


def test_a_copy_carries_no_activations():
    import copy
    lin = nn.Linear(3, 2, rng=np.random.default_rng(16))
    lin(np.ones((4, 3), np.float32))
    for clone in (pickle.loads(pickle.dumps(lin)), copy.deepcopy(lin)):
        assert clone._saved is None
        with pytest.raises(RuntimeError, match="no training-mode forward"):
            clone.backward(np.ones((4, 2), np.float32))
    assert lin._saved is not None                              # the original keeps its own


def test_grads_of_the_trainable_parameters_only():
    model = nn.Sequential([nn.Linear(3, 4, rng=np.random.default_rng(17)), nn.Linear(4, 2)])
    model.freeze("0")
    assert list(model.grads(trainable_only=True)) == ["1.weight", "1.bias"]
    assert list(model.grads()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("name", ["Linear", "LayerNorm", "RMSNorm", "BatchNorm1d", "GELU", "SiLU",
                                  "Sigmoid", "Tanh", "Sequential", "Embedding"])
def test_float64_finite_differences(name):
    """Each layer's backward is the derivative of its forward, without
    PyTorch: central differences along random directions (tests/gradients.py)."""
    rng = np.random.default_rng(18)
    x = randn(rng, (4, 5, 6), np.float64)
    if name == "Linear":
        module = nn.Linear(6, 3, dtype=np.float64, rng=rng)
    elif name in ("LayerNorm", "RMSNorm"):
        module = getattr(nn, name)(6, dtype=np.float64)
    elif name == "BatchNorm1d":
        module = nn.BatchNorm1d(5, dtype=np.float64)
    elif name == "Sequential":
        module = nn.Sequential([nn.Linear(6, 8, dtype=np.float64, rng=rng), nn.GELU("tanh"),
                                nn.LayerNorm(8, dtype=np.float64), nn.Linear(8, 2, dtype=np.float64, rng=rng)])
    elif name == "Embedding":
        # no padding_idx: its row is read but gets no gradient by definition
        # (PyTorch's), which test_embedding checks against torch
        module = nn.Embedding(7, 3, dtype=np.float64, rng=rng)
        x = np.array([[0, 2, 5], [5, 1, 6]])
    else:
        module = getattr(nn, name)()
    for _, p in module.named_parameters():        # away from the ones and zeros they start at
        p += 0.3 * rng.standard_normal(p.shape)
    check_finite_differences(module, [x])
