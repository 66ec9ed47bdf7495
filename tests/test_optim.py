"""attnkit.optim: SGD, Adam and AdamW against torch.optim step by step,
freezing, resuming from state dicts, clip_grad_norm against
torch.nn.utils.clip_grad_norm_, the schedules against their formulas,
torch's LambdaLR and transformers' schedules, and argument checks.

Gradients come from real backward calls through an nn.Sequential; the same
gradients are handed to torch's parameters, so the two optimizers see the
same inputs and any difference is the optimizer's arithmetic.
"""
import math

import numpy as np
import pytest

from attnkit import nn, optim
from accuracy import torch_or_skip, transformers_or_skip
from threads import thread_count

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.05)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    # beta1 < 0.5 takes torch.lerp's other form
    ("Adam", dict(lr=0.01, betas=(0.3, 0.8), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
]
OPTIMIZER_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in OPTIMIZERS]


def make_model(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential([nn.Linear(4, 6, dtype=dtype, rng=rng), nn.ReLU(),
                          nn.Linear(6, 3, dtype=dtype, rng=rng)])


def backward(model, rng):
    """One real forward and backward with a random input and upstream gradient."""
    dtype = model.dtype
    y = model(rng.standard_normal((5, 4)).astype(dtype))
    model.backward(rng.standard_normal(y.shape).astype(dtype))


def torch_twin(torch, model):
    return {name: torch.tensor(value.copy(), requires_grad=True)
            for name, value in model.named_parameters()}


def feed_torch(torch, model, tparams, frozen=()):
    """The module's gradients into torch's .grad; None for frozen parameters,
    which torch's optimizers then skip, as attnkit's skip frozen ones."""
    grads = model.grads()
    for name, tp in tparams.items():
        tp.grad = None if name in frozen else torch.tensor(grads[name].copy())


def assert_close(ours, theirs, what):
    theirs = np.asarray(theirs)
    assert ours.dtype == theirs.dtype, what
    tol = TOL[ours.dtype]
    scale = max(float(np.max(np.abs(theirs))), np.finfo(ours.dtype).tiny)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale, err_msg=what)


def params(model):
    return {name: value.copy() for name, value in model.named_parameters()}


# ---------------------------------------------------------------------------
# Trajectories against torch.optim

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_trajectory_matches_torch(name, kwargs, dtype):
    torch = torch_or_skip()
    model = make_model(dtype)
    tparams = torch_twin(torch, model)
    opt = getattr(optim, name)(model, **kwargs)
    topt = getattr(torch.optim, name)(list(tparams.values()), foreach=False, **kwargs)
    arrays = dict(model.named_parameters())
    rng = np.random.default_rng(1)
    for step in range(1, 21):
        if step == 11:  # a schedule's change of lr between steps
            opt.lr = kwargs["lr"] / 3
            topt.param_groups[0]["lr"] = kwargs["lr"] / 3
        opt.zero_grad()
        backward(model, rng)
        grads_before = {k: v.copy() for k, v in model.grads().items()}
        feed_torch(torch, model, tparams)
        opt.step()
        topt.step()
        for pname, tp in tparams.items():
            assert_close(arrays[pname], tp.detach().numpy(), f"{pname} after step {step}")
        for gname, g in model.grads().items():  # the step reads the gradients only
            np.testing.assert_array_equal(g, grads_before[gname])
    # in place: the modules hold the same arrays, of the same dtype
    assert all(arrays[k] is v for k, v in model.named_parameters())
    assert all(v.dtype == np.dtype(dtype) for v in arrays.values())
    # and the optimizer state is torch's
    state = opt.state_dict()["state"]
    for pname, tp in tparams.items():
        tstate = topt.state[tp]
        assert state[pname]["step"] == 20
        for key, value in tstate.items():
            if key == "step":
                assert float(value) == 20
            elif value is not None:
                assert state[pname][key].dtype == np.dtype(dtype)
                assert_close(state[pname][key], value.numpy(), f"state {key} of {pname}")


def test_forward_sees_updated_weights():
    """Updates are in place; the next forward must use them (no stale packed copy)."""
    model = make_model(np.float64)
    opt = optim.SGD(model, lr=0.5, momentum=0.9)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 4))
    first = model[0]
    before = first(x)
    for _ in range(3):
        opt.zero_grad()
        backward(model, rng)
        opt.step()
    after = first(x)
    np.testing.assert_allclose(after, x @ first.weight.T + first.bias, rtol=1e-12, atol=1e-12)
    assert not np.allclose(after, before)


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                         ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
                                         ("AdamW", dict(lr=0.01, weight_decay=0.5))],
                         ids=["SGD", "Adam", "AdamW"])
def test_frozen_parameters_untouched_and_as_torch(name, kwargs):
    """Frozen parameters (and their state) stay bit for bit, weight decay
    included; freezing can change between steps; per-parameter step counts
    then differ, as torch's when a parameter's .grad is None."""
    torch = torch_or_skip()
    model = make_model(np.float64)
    tparams = torch_twin(torch, model)
    opt = getattr(optim, name)(model, **kwargs)
    topt = getattr(torch.optim, name)(list(tparams.values()), foreach=False, **kwargs)
    rng = np.random.default_rng(3)
    arrays = dict(model.named_parameters())
    plan = {3: ("0",), 4: ("0",), 5: ("0", "2.bias"), 8: ("2",)}  # step -> frozen prefixes
    for step in range(1, 11):
        model.unfreeze()
        if step in plan:
            model.freeze(*plan[step])
        frozen = {n for n in arrays if n not in dict(model.trainable_parameters())}
        saved_state = opt.state_dict()["state"]
        before = params(model)
        opt.zero_grad()
        backward(model, rng)
        feed_torch(torch, model, tparams, frozen)
        opt.step()
        topt.step()
        after_state = opt.state_dict()["state"]
        for pname in arrays:
            assert_close(arrays[pname], tparams[pname].detach().numpy(), f"{pname} step {step}")
            if pname in frozen:
                assert np.array_equal(arrays[pname], before[pname]), f"{pname} moved at {step}"
                assert arrays[pname].tobytes() == before[pname].tobytes()
                old, new = saved_state.get(pname), after_state.get(pname)
                assert (old is None) == (new is None)
                if old is not None:
                    assert old.keys() == new.keys() and old["step"] == new["step"]
                    for key in old:
                        if isinstance(old[key], np.ndarray):
                            assert old[key].tobytes() == new[key].tobytes()
            else:
                assert not np.array_equal(arrays[pname], before[pname])
    steps = {n: s["step"] for n, s in opt.state_dict()["state"].items()}
    assert steps == {"0.weight": 7, "0.bias": 7, "2.weight": 9, "2.bias": 8}


def test_module_conversion_between_steps_converts_state():
    model = make_model(np.float32)
    opt = optim.Adam(model, lr=0.01)
    rng = np.random.default_rng(4)
    backward(model, rng)
    opt.step()
    model.astype(np.float64)
    opt.zero_grad()
    backward(model, rng)
    opt.step()
    for state in opt.state_dict()["state"].values():
        assert state["exp_avg"].dtype == np.float64 and state["step"] == 2


# ---------------------------------------------------------------------------
# State dicts: resuming is bitwise the run that never stopped

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,kwargs", [OPTIMIZERS[i] for i in (0, 5, 6, 10, 12)],
                         ids=[OPTIMIZER_IDS[i] for i in (0, 5, 6, 10, 12)])
def test_state_dict_resume_is_bitwise(name, kwargs, dtype):
    def run(model, opt, schedule, rng, steps):
        for _ in range(steps):
            opt.zero_grad()
            backward(model, rng)
            optim.clip_grad_norm(model, 0.5)
            opt.step()
            schedule.step()

    # uninterrupted: 12 steps
    model = make_model(dtype)
    opt = getattr(optim, name)(model, **kwargs)
    schedule = optim.LinearWarmupCosine(opt, warmup_steps=3, total_steps=12, min_lr=1e-4)
    run(model, opt, schedule, np.random.default_rng(5), 12)

    # interrupted after 5; resumed into a fresh model, optimizer and schedule
    rng = np.random.default_rng(5)
    first = make_model(dtype)
    opt1 = getattr(optim, name)(first, **kwargs)
    schedule1 = optim.LinearWarmupCosine(opt1, warmup_steps=3, total_steps=12, min_lr=1e-4)
    run(first, opt1, schedule1, rng, 5)
    weights = {k: v.copy() for k, v in first.state_dict().items()}
    saved, saved_schedule = opt1.state_dict(), schedule1.state_dict()
    snapshot = {n: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                for n, s in saved["state"].items()}
    run(first, opt1, schedule1, np.random.default_rng(99), 2)  # must not reach `saved`
    for pname, entry in saved["state"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                assert value.tobytes() == snapshot[pname][key].tobytes()

    second = make_model(dtype, seed=7)
    second.load_state_dict(weights)
    opt2 = getattr(optim, name)(second, lr=123.0)
    schedule2 = optim.LinearWarmupCosine(opt2, warmup_steps=1, total_steps=2)
    opt2.load_state_dict(saved)
    schedule2.load_state_dict(saved_schedule)
    assert opt2.hyperparameters == saved["hyperparameters"]
    assert opt2.lr == schedule2.get_last_lr() == saved["hyperparameters"]["lr"]
    run(second, opt2, schedule2, rng, 7)

    for (k, ours), (_, expected) in zip(second.named_parameters(), model.named_parameters()):
        assert ours.tobytes() == expected.tobytes(), k
    assert opt2.lr == opt.lr and schedule2.state_dict() == schedule.state_dict()
    for pname, entry in opt.state_dict()["state"].items():
        resumed = opt2.state_dict()["state"][pname]
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                assert resumed[key].tobytes() == value.tobytes(), (pname, key)
            else:
                assert resumed[key] == value


def test_state_dict_contents_and_copies():
    model = make_model(np.float32)
    opt = optim.AdamW(model, lr=0.02, amsgrad=True)
    assert opt.state_dict() == {"optimizer": "AdamW", "state": {},
                                "hyperparameters": {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8,
                                                    "weight_decay": 0.01, "amsgrad": True}}
    backward(model, np.random.default_rng(0))
    opt.step()
    state = opt.state_dict()
    assert list(state["state"]) == [n for n, _ in model.named_parameters()]
    entry = state["state"]["0.weight"]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} and entry["step"] == 1
    assert entry["exp_avg"].dtype == np.float32 and entry["exp_avg"].shape == (6, 4)
    live = opt._state["0.weight"]["exp_avg"]
    assert not np.shares_memory(entry["exp_avg"], live)
    # loading copies too
    opt.load_state_dict(state)
    assert not np.shares_memory(opt._state["0.weight"]["exp_avg"], entry["exp_avg"])
    # float64 buffers load into a float32 module as float32
    entry["exp_avg"] = entry["exp_avg"].astype(np.float64)
    opt.load_state_dict(state)
    assert opt._state["0.weight"]["exp_avg"].dtype == np.float32
    # SGD without momentum keeps a step count only
    sgd = optim.SGD(model, lr=0.1)
    sgd.step()
    assert sgd.state_dict()["state"]["0.bias"] == {"step": 1, "momentum_buffer": None}
    assert optim.SGD(model, lr=0.1).load_state_dict(sgd.state_dict()) is None


def bad_state(mutate):
    model = make_model(np.float64)
    opt = optim.Adam(model, lr=0.01)
    backward(model, np.random.default_rng(0))
    opt.step()
    state = opt.state_dict()
    mutate(state)
    return opt, state


@pytest.mark.parametrize("mutate,error,match", [
    (lambda s: s.pop("state"), KeyError, "missing keys: state"),
    (lambda s: s.update(extra=1), KeyError, "unexpected keys: extra"),
    (lambda s: s.update(optimizer="SGD"), ValueError, "'SGD' optimizer's, not a Adam's"),
    (lambda s: s["hyperparameters"].pop("eps"), KeyError, "missing keys: eps"),
    (lambda s: s["hyperparameters"].update(lr=-1.0), ValueError, "lr must be .* got -1.0"),
    (lambda s: s["hyperparameters"].update(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (lambda s: s["hyperparameters"].update(amsgrad=True), KeyError, "missing keys: max_exp_avg_sq"),
    (lambda s: s["state"].update({"3.weight": s["state"]["0.weight"]}), KeyError,
     "state for 3.weight, which the module does not have"),
    (lambda s: s["state"]["0.bias"].pop("exp_avg_sq"), KeyError, "missing keys: exp_avg_sq"),
    (lambda s: s["state"]["0.bias"].update(step=-1), ValueError, "step of '0.bias'"),
    (lambda s: s["state"]["0.bias"].update(step=1.5), TypeError, "step of '0.bias'"),
    (lambda s: s["state"]["0.bias"].update(exp_avg=np.zeros(5)), ValueError,
     r"'exp_avg' of '0.bias' has shape \(5,\), but the parameter has \(6,\)"),
    (lambda s: s["state"]["0.bias"].update(exp_avg=np.zeros(6, int)), TypeError, "float array"),
    (lambda s: s.update(state=[]), TypeError, "'state' must be a dict"),
], ids=["no-state", "extra-key", "other-optimizer", "no-eps", "bad-lr", "bad-beta", "amsgrad",
        "unknown-param", "no-buffer", "negative-step", "float-step", "shape", "int-buffer",
        "state-list"])
def test_load_state_dict_errors_change_nothing(mutate, error, match):
    opt, state = bad_state(mutate)
    before = opt.state_dict()
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["hyperparameters"] == before["hyperparameters"]
    for pname, entry in before["state"].items():
        for key, value in entry.items():
            assert np.array_equal(after["state"][pname][key], value)


# ---------------------------------------------------------------------------
# clip_grad_norm against torch.nn.utils.clip_grad_norm_

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype):
    torch = torch_or_skip()
    model = make_model(dtype)
    backward(model, np.random.default_rng(6))
    model.freeze("2.bias")  # frozen gradients neither count nor change
    frozen_grad = model.grads()["2.bias"].copy()
    tparams = torch_twin(torch, model)
    feed_torch(torch, model, tparams, frozen={"2.bias"})
    trainable = [tp for n, tp in tparams.items() if n != "2.bias"]
    before = {k: v.copy() for k, v in model.grads().items()}

    total = optim.clip_grad_norm(model, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(trainable, max_norm, norm_type, foreach=False)

    assert isinstance(total, float)
    exact = sum(float(np.sum(np.abs(before[n].astype(np.float64)) ** 2)) for n in before
                if n != "2.bias") ** 0.5
    if norm_type == 2.0:  # computed in float64 even for float32 gradients
        assert total == pytest.approx(exact, rel=1e-14)
    assert total == pytest.approx(float(expected), rel=TOL[np.dtype(dtype)])
    grads = model.grads()
    clipped = total > max_norm
    for name, tp in tparams.items():
        if name == "2.bias":
            assert np.array_equal(grads[name], frozen_grad)
        elif not clipped:
            assert grads[name].tobytes() == before[name].tobytes()
        else:
            assert_close(grads[name], tp.grad.numpy(), name)
    if clipped:
        assert optim.clip_grad_norm(model, max_norm, norm_type) == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_nonfinite():
    torch = torch_or_skip()
    model = make_model(np.float64)
    backward(model, np.random.default_rng(7))
    model.grads()["0.bias"][1] = np.inf
    with pytest.raises(RuntimeError, match="non-finite|cannot be clipped"):
        optim.clip_grad_norm(model, 1.0, error_if_nonfinite=True)
    assert np.isinf(model.grads()["0.bias"][1])  # raising changed nothing
    tparams = torch_twin(torch, model)
    feed_torch(torch, model, tparams)
    assert optim.clip_grad_norm(model, 1.0) == math.inf
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0, foreach=False)
    for name, tp in tparams.items():  # PyTorch's NaNs and zeros, in the same places
        np.testing.assert_array_equal(model.grads()[name], tp.grad.numpy())


def test_clip_grad_norm_no_trainable_parameters():
    model = make_model(np.float32)
    backward(model, np.random.default_rng(8))
    model.freeze()
    assert optim.clip_grad_norm(model, 1.0) == 0.0


# ---------------------------------------------------------------------------
# Schedules

def drive(schedule, steps):
    """The lr of each optimizer step 0..steps-1 (set before it), as a list."""
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.optimizer.lr)
        assert schedule.get_last_lr() == schedule.optimizer.lr
        schedule.step()
    return lrs


def cosine_formula(n, base, warmup, total, min_lr):
    if n < warmup:
        return base * n / warmup
    progress = min(1.0, (n - warmup) / max(1, total - warmup))
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,total,min_lr", [(10, 50, 0.0), (0, 20, 0.0), (5, 30, 1e-4),
                                                 (7, 7, 0.0)])
def test_linear_warmup_cosine(warmup, total, min_lr):
    base = 3e-3
    opt = optim.AdamW(make_model(np.float32), lr=base)
    schedule = optim.LinearWarmupCosine(opt, warmup, total, min_lr=min_lr)
    lrs = drive(schedule, total + 10)
    expected = [cosine_formula(n, base, warmup, total, min_lr) for n in range(total + 10)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-18)
    assert lrs[0] == (0.0 if warmup else base)
    assert lrs[warmup] == base
    end = max(total, warmup + 1)  # with warmup == total, the cosine is one step long
    assert all(lr == lrs[end] for lr in lrs[end:])  # past total_steps it stays at min_lr
    assert lrs[end] == pytest.approx(min_lr, rel=1e-12, abs=1e-20)
    assert schedule.last_step == total + 10


@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_linear_warmup_cosine_as_transformers_and_lambda_lr(min_lr):
    torch = torch_or_skip()
    base, warmup, total = 3e-3, 10, 60
    schedule = optim.LinearWarmupCosine(optim.SGD(make_model(np.float32), lr=base), warmup, total,
                                        min_lr=min_lr)
    ours = drive(schedule, total + 1)

    def torch_lrs(make):
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        tschedule = make(topt)
        lrs = []
        for _ in range(total + 1):
            lrs.append(topt.param_groups[0]["lr"])
            topt.step()
            tschedule.step()
        return lrs

    assert ours == torch_lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule.factor))
    optimization = transformers_or_skip().optimization
    if min_lr == 0:
        reference = torch_lrs(lambda o: optimization.get_cosine_schedule_with_warmup(o, warmup, total))
    else:
        reference = torch_lrs(lambda o: optimization.get_cosine_with_min_lr_schedule_with_warmup(
            o, warmup, total, min_lr=min_lr))
    assert ours == reference  # the same floating-point operations


@pytest.mark.parametrize("d_model", [None, 512])
def test_inverse_sqrt(d_model):
    torch = torch_or_skip()
    warmup = 8
    base = 1.0 if d_model else 5e-4
    schedule = optim.InverseSqrt(optim.Adam(make_model(np.float32), lr=base), warmup, d_model=d_model)
    ours = drive(schedule, 40)
    scale = d_model ** -0.5 if d_model else warmup ** 0.5
    expected = [base * scale * min(n ** -0.5, n * warmup ** -1.5) for n in range(1, 41)]
    np.testing.assert_allclose(ours, expected, rtol=1e-14)
    assert all(lr > 0 for lr in ours)
    peak = max(ours)
    assert ours.index(peak) == warmup - 1  # the warmup-th optimizer step
    if d_model is None:
        assert peak == pytest.approx(base, rel=1e-14)
        assert ours[4 * warmup - 1] == pytest.approx(base / 2, rel=1e-14)  # sqrt(W / n)
    else:
        # Vaswani et al.: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
        assert peak == pytest.approx(d_model ** -0.5 * warmup ** -0.5, rel=1e-14)
    topt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=base)
    tschedule = torch.optim.lr_scheduler.LambdaLR(topt, schedule.factor)
    lambda_lrs = []
    for _ in range(40):
        lambda_lrs.append(tschedule.get_last_lr()[0])
        topt.step()
        tschedule.step()
    assert ours == lambda_lrs


def test_schedule_state_dict_round_trip():
    opt = optim.SGD(make_model(np.float32), lr=0.1)
    schedule = optim.InverseSqrt(opt, 4, d_model=64)
    drive(schedule, 6)
    state = schedule.state_dict()
    assert state == {"schedule": "InverseSqrt", "base_lr": 0.1, "last_step": 6, "warmup_steps": 4,
                     "d_model": 64}
    fresh_opt = optim.SGD(make_model(np.float32), lr=7.0)
    fresh = optim.InverseSqrt(fresh_opt, 100)
    fresh.load_state_dict(state)
    assert fresh_opt.lr == schedule.get_last_lr() == fresh.get_last_lr()
    assert drive(fresh, 5) == drive(schedule, 5)
    with pytest.raises(ValueError, match="'InverseSqrt' schedule's, not a LinearWarmupCosine's"):
        optim.LinearWarmupCosine(fresh_opt, 1, 2).load_state_dict(state)
    with pytest.raises(KeyError, match="missing keys: d_model"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "d_model"})
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1, got 0"):
        fresh.load_state_dict(state | {"warmup_steps": 0})
    assert fresh.warmup_steps == 4 and fresh.last_step == 11  # unchanged by the failures


# ---------------------------------------------------------------------------
# Arguments

def test_lr_is_settable_and_checked():
    opt = optim.Adam(make_model(np.float32))
    assert opt.lr == 1e-3 and opt.betas == (0.9, 0.999) and opt.amsgrad is False
    opt.lr = 0.25
    assert opt.lr == 0.25 and opt.hyperparameters["lr"] == 0.25
    opt.lr = np.float32(0.5)
    assert type(opt.lr) is float  # a weak scalar: float32 arithmetic stays float32
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        opt.lr = -0.1
    with pytest.raises(TypeError, match="lr must be a real number"):
        opt.lr = "0.1"
    assert opt.lr == 0.5
    assert repr(opt) == "Adam(lr=0.5, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)"


@pytest.mark.parametrize("make,error,match", [
    (lambda m: optim.SGD(m, lr=-1), ValueError, "SGD: lr must be a finite number >= 0, got -1"),
    (lambda m: optim.SGD(m, lr=float("nan")), ValueError, "lr must be .* got nan"),
    (lambda m: optim.SGD(m, lr=0.1, momentum=-0.5), ValueError, "momentum .* got -0.5"),
    (lambda m: optim.SGD(m, lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay .* got -0.0001"),
    (lambda m: optim.SGD(m, lr=0.1, nesterov=True), ValueError,
     "nesterov=True needs momentum > 0 and dampening = 0, got momentum=0.0"),
    (lambda m: optim.SGD(m, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "dampening=0.1"),
    (lambda m: optim.SGD(m, lr=0.1, nesterov=1), TypeError, "nesterov must be a bool"),
    (lambda m: optim.SGD(m, lr="0.1"), TypeError, "lr must be a real number"),
    (lambda m: optim.Adam(m, lr=-1e-3), ValueError, "Adam: lr .* got -0.001"),
    (lambda m: optim.Adam(m, betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (lambda m: optim.Adam(m, betas=(0.9, -0.1)), ValueError, r"betas\[1\] .* got -0.1"),
    (lambda m: optim.Adam(m, betas=0.9), TypeError, "betas must be a pair"),
    (lambda m: optim.Adam(m, betas=(0.9, 0.99, 0.9)), TypeError, "betas must be a pair"),
    (lambda m: optim.Adam(m, eps=-1e-8), ValueError, "eps .* got -1e-08"),
    (lambda m: optim.Adam(m, weight_decay=-0.1), ValueError, "weight_decay .* got -0.1"),
    (lambda m: optim.AdamW(m, weight_decay=float("inf")), ValueError, "AdamW: weight_decay .* got inf"),
    (lambda m: optim.AdamW(m, amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    (lambda m: optim.Adam([np.zeros(3)]), TypeError,
     "expected an attnkit.nn.Module, got list"),
    (lambda m: optim.SGD(nn.ReLU(), lr=0.1), ValueError, "has no parameters"),
    (lambda m: optim.clip_grad_norm(m, -1.0), ValueError, "max_norm must be >= 0, got -1.0"),
    (lambda m: optim.clip_grad_norm(m, 1.0, norm_type=0), ValueError, "norm_type must be a positive"),
    (lambda m: optim.clip_grad_norm(m, 1.0, norm_type="two"), TypeError, "norm_type must be a real"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), -1, 10), ValueError,
     "warmup_steps must be an int >= 0, got -1"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), 0, 0), ValueError,
     "total_steps must be an int >= 1, got 0"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), 11, 10), ValueError,
     r"warmup_steps \(11\) must not exceed total_steps \(10\)"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), 1, 10, min_lr=0.2), ValueError,
     r"min_lr \(0.2\) must not exceed the optimizer's lr \(0.1\)"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), 1, 10, min_lr=-1.0), ValueError,
     "min_lr must be .* got -1.0"),
    (lambda m: optim.LinearWarmupCosine(optim.SGD(m, lr=0.1), 2.5, 10), TypeError,
     "warmup_steps must be an int"),
    (lambda m: optim.InverseSqrt(optim.SGD(m, lr=0.1), 0), ValueError,
     "warmup_steps must be an int >= 1, got 0"),
    (lambda m: optim.InverseSqrt(optim.SGD(m, lr=0.1), 10, d_model=0), ValueError,
     "d_model must be an int >= 1, got 0"),
    (lambda m: optim.InverseSqrt(object(), 10), TypeError, "expected an attnkit.optim optimizer"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(make_model(np.float32))


def test_step_checks_before_writing():
    model = make_model(np.float32)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    backward(model, np.random.default_rng(9))
    before = params(model)
    model[2].bias.flags.writeable = False
    with pytest.raises(ValueError, match="'2.bias' is read-only"):
        opt.step()
    for name, value in model.named_parameters():  # nothing written, no state made
        assert value.tobytes() == before[name].tobytes()
    assert opt.state_dict()["state"] == {}


# ---------------------------------------------------------------------------
# The Adam kernel (csrc/optim.c) against its NumPy oracle, bit for bit

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("beta1", [0.9, 0.3])                 # torch.lerp's two forms
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_kernel_is_its_reference_bit_for_bit(simd, dtype, decoupled, amsgrad, beta1, weight_decay):
    from attnkit import _kernels, reference
    rng = np.random.default_rng(0)
    n = 40000 + 3                                          # several chunks and a tail
    p = rng.standard_normal(n).astype(dtype)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(dtype)
    m = (rng.standard_normal(n) * 0.1).astype(dtype)
    v = np.abs(rng.standard_normal(n) * 0.01).astype(dtype)
    vmax = np.maximum(v, np.abs(rng.standard_normal(n) * 0.01).astype(dtype)) if amsgrad else None
    if amsgrad:
        vmax[:3] = np.nan                                   # np.maximum's NaN rule
    hyper = dict(lr=3e-3, betas=(beta1, 0.98), eps=1e-8, weight_decay=weight_decay, step=7,
                 decoupled=decoupled)
    expected = reference.adam_step(p, g, m, v, vmax, **hyper)
    g_before = g.copy()
    for threads in (1, 2, 3):
        got = [p.copy(), m.copy(), v.copy(), None if vmax is None else vmax.copy()]
        with thread_count(threads):
            _kernels.adam_step(got[0], got[1], got[2], got[3], g, hyper["lr"], beta1, 0.98, 1e-8,
                               weight_decay, 3e-3 / (1 - beta1 ** 7), (1 - 0.98 ** 7) ** 0.5, decoupled)
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
            if b is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{name} at {threads} thread(s)")
    np.testing.assert_array_equal(g, g_before)


def test_adam_kernel_refuses_what_it_cannot_take():
    from attnkit import _kernels
    p = np.zeros(4, np.float32)
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1e-2, 0.1, True)
    with pytest.raises(TypeError, match="one dtype"):
        _kernels.adam_step(p, np.zeros(4), np.zeros(4, np.float32), None, np.zeros(4, np.float32), *args)
    with pytest.raises(ValueError, match="shape"):
        _kernels.adam_step(p, np.zeros(5, np.float32), np.zeros(4, np.float32), None, np.zeros(4, np.float32), *args)
    with pytest.raises(ValueError, match="C-contiguous"):
        _kernels.adam_step(p, np.zeros(8, np.float32)[::2], np.zeros(4, np.float32), None,
                           np.zeros(4, np.float32), *args)
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _kernels.adam_step(frozen, np.zeros(4, np.float32), np.zeros(4, np.float32), None,
                           np.zeros(4, np.float32), *args)
