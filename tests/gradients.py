"""Module gradients against torch.autograd, the rule every module test uses.

attnkit's module and PyTorch's are given the same weights (PyTorch's loads
attnkit's state dict, whose names and layouts are PyTorch's), run on the same
inputs, and sent the same upstream gradient. Every input gradient and every
parameter gradient must then agree within TOLERANCE of that gradient's scale
(its largest magnitude in PyTorch's result): 1e-4 in float32, 1e-9 in float64.
"""
import numpy as np

from accuracy import torch_or_skip

TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


def torch_dtype(torch, dtype):
    return torch.float32 if np.dtype(dtype) == np.float32 else torch.float64


def load_into_torch(torch, ours, theirs, dtype):
    """theirs.load_state_dict(ours.state_dict()), as float tensors of dtype."""
    theirs.to(torch_dtype(torch, dtype))
    state = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    return theirs


def assert_close(ours, theirs, dtype, what, scale_floor=0.0):
    """ours within TOLERANCE of theirs's largest magnitude, or of scale_floor
    when that is larger (for a gradient that is 0 in exact arithmetic, such
    as a key projection's bias under softmax: the scale of the terms that
    cancel in it)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != PyTorch's {theirs.shape}"
    assert np.all(np.isfinite(ours) == np.isfinite(theirs)), f"{what}: non-finite values differ"
    finite = np.isfinite(theirs)
    if not finite.any():
        return
    scale = max(float(np.max(np.abs(theirs[finite]))), scale_floor, np.finfo(dtype).tiny)
    err = float(np.max(np.abs(ours[finite].astype(np.float64) - theirs[finite])))
    assert err <= TOLERANCE[np.dtype(dtype)] * scale, (
        f"{what}: max error {err:.3g} against PyTorch's, scale {scale:.3g} "
        f"(relative {err / scale:.3g}, allowed {TOLERANCE[np.dtype(dtype)]})")


def check_module(ours, theirs, inputs, dtype, *, call=None, torch_call=None, grad_seed=0,
                 frozen=(), output_index=None):
    """Forward both modules on `inputs` (float arrays are differentiated,
    others passed as they are), backward one random upstream gradient, and
    compare outputs, input gradients and parameter gradients.

    call(module, *inputs) and torch_call(module, *tensors) run the forward
    (default: module(*inputs)); output_index picks the differentiated output
    when the forward returns a tuple. frozen: parameter names frozen in
    attnkit's module, which must get no gradient (PyTorch's get
    requires_grad=False). Returns attnkit's output and input gradients."""
    torch = torch_or_skip()
    call = call or (lambda m, *a: m(*a))
    torch_call = torch_call or call
    load_into_torch(torch, ours, theirs, dtype)
    for name, p in theirs.named_parameters():
        p.requires_grad_(name not in frozen)
        p.grad = None
    ours.train()
    theirs.train()
    if frozen:
        ours.freeze(*frozen)
    ours.zero_grad()

    def pick(out):
        return out[output_index] if output_index is not None else out

    differentiable = [isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in inputs]
    tensors = [torch.from_numpy(a.copy()).requires_grad_(d) if isinstance(a, np.ndarray) else a
               for a, d in zip(inputs, differentiable)]
    saved_inputs = [a.copy() if isinstance(a, np.ndarray) else None for a in inputs]
    out = pick(call(ours, *inputs))
    out_t = pick(torch_call(theirs, *tensors))
    assert_close(out, out_t.detach().numpy(), dtype, "output")
    grad = np.random.default_rng(grad_seed).standard_normal(out.shape).astype(dtype)
    d_inputs = ours.backward(grad)
    out_t.backward(torch.from_numpy(grad))
    for a, before in zip(inputs, saved_inputs):     # backward leaves its inputs alone
        if before is not None:
            assert np.array_equal(a, before)
    as_tuple = (d_inputs if isinstance(d_inputs, tuple) else
                () if d_inputs is None else (d_inputs,))
    wanted = [t for t, d in zip(tensors, differentiable) if d]
    assert len(as_tuple) == len(wanted), f"backward returned {len(as_tuple)} gradients for {len(wanted)} inputs"
    for i, (mine, t) in enumerate(zip(as_tuple, wanted)):
        reference = t.grad if t.grad is not None else torch.zeros_like(t)
        assert_close(mine, reference.numpy(), dtype, f"input {i}'s gradient")
    grads = ours.grads()
    names = [n for n, _ in ours.named_parameters()]
    assert list(grads) == names
    theirs_params = dict(theirs.named_parameters())
    for name in names:
        assert grads[name].shape == ours.state_dict()[name].shape
        if name in frozen:
            assert not grads[name].any(), f"frozen {name} got a gradient"
            continue
        reference = theirs_params[name].grad
        reference = np.zeros(grads[name].shape) if reference is None else reference.numpy()
        assert_close(grads[name], reference, dtype, f"{name}'s gradient")
    return out, d_inputs


def check_finite_differences(module, inputs, *, call=None, h=1e-6, seed=0):
    """float64 central differences against module.backward: for a random
    upstream gradient g and random directions, the change of sum(g * out)
    along each direction must equal the gradient's dot product with it, for
    every float input and every parameter (within 1e-6 of the terms' scale)."""
    call = call or (lambda m, *a: m(*a))
    rng = np.random.default_rng(seed)
    module.train()
    module.zero_grad()
    out = call(module, *inputs)
    g = rng.standard_normal(out.shape)
    d_inputs = module.backward(g)
    d_inputs = d_inputs if isinstance(d_inputs, tuple) else (d_inputs,)
    float_inputs = [a for a in inputs if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    targets = list(zip(float_inputs, d_inputs)) + [
        (p, module.grads()[name]) for name, p in module.named_parameters()]
    for array, grad in targets:
        direction = rng.standard_normal(array.shape)
        saved = array.copy()
        array += h * direction
        up = float(np.sum(g * call(module, *inputs)))
        array[...] = saved - h * direction
        down = float(np.sum(g * call(module, *inputs)))
        array[...] = saved
        numeric, analytic = (up - down) / (2 * h), float(np.sum(grad * direction))
        scale = max(1.0, float(np.sum(np.abs(grad * direction))))
        assert abs(numeric - analytic) <= 1e-6 * scale, (array.shape, numeric, analytic)
