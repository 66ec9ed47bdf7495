"""attnkit.optim: SGD, Adam and AdamW with PyTorch's update rules, learning-rate
schedules and gradient clipping, for attnkit.nn modules.

    >>> import numpy as np
    >>> from attnkit import nn, optim
    >>> model = nn.Linear(3, 1, rng=np.random.default_rng(0))
    >>> opt = optim.AdamW(model, lr=0.1)
    >>> schedule = optim.LinearWarmupCosine(opt, warmup_steps=5, total_steps=100)
    >>> x = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)
    >>> y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    >>> mse = nn.MSELoss()
    >>> for _ in range(100):
    ...     opt.zero_grad()
    ...     loss = mse(model(x), y)
    ...     _ = model.backward(mse.backward())
    ...     _ = optim.clip_grad_norm(model, max_norm=1.0)
    ...     opt.step()
    ...     schedule.step()
    >>> bool(loss < 1e-3), schedule.get_last_lr()
    (True, 0.0)

An optimizer holds a module, not a list of arrays. At every step() it asks the
module which parameters are trainable (`module.freeze` may change that between
steps: a frozen parameter is left exactly as it is, weight decay included, and
so is its optimizer state) and reads their gradients from `module.grads()`,
where backward calls accumulate them. A trainable parameter whose gradient is
all zeros is still stepped, as PyTorch steps a parameter whose gradient was
zeroed rather than set to None (Adam's moments keep moving it).

Parameters are updated in place, so the arrays the modules hold, and any a
user holds, stay the same objects. Each update follows torch.optim's
single-tensor ("for-loop") implementation operation by operation, in the
parameter's dtype (float32 or float64), with optimizer state in that dtype
too. PyTorch's vectorised CPU kernels fuse some multiply-adds, so results
agree with PyTorch's to rounding (about 1e-15 relative in float64), not
always bit for bit; attnkit's own results are deterministic, so a run resumed
from state_dict() is bitwise the run that never stopped.
"""
from __future__ import annotations

import collections.abc
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kernels
from . import functional as F
from .functional import _contiguous
from .nn.module import key_mismatch

if TYPE_CHECKING:
    import numpy.typing as npt

    from .nn.module import Module

    _Array = npt.NDArray[Any]

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm",
           "LRSchedule", "LinearWarmupCosine", "InverseSqrt"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------
# Argument checks: a wrong type is a TypeError, a wrong value a ValueError
# naming it (PyTorch's "Invalid learning rate: -1", with the owner's name).

def _at_least(value: object, owner: str, name: str, low: float = 0.0) -> float:
    """A finite real number >= low, as a Python float (a Python float is a
    "weak" scalar to NumPy, so float32 arrays stay float32 in arithmetic)."""
    number = F._real(value, owner, name)
    if not (math.isfinite(number) and number >= low):  # NaN fails both
        raise ValueError(f"{owner}: {name} must be a finite number >= {low:g}, got {value!r}")
    return number


def _finite(value: object, owner: str, name: str) -> float:
    number = F._real(value, owner, name)
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return number


def _count(value: object, owner: str, name: str, low: int) -> int:
    """An int >= low (a number of steps, a model width)."""
    number = F._index(value, owner, name)
    if number < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return number


def _betas(value: Any, owner: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence) \
            or len(value) != 2:
        raise TypeError(f"{owner}: betas must be a pair (beta1, beta2), got {value!r}")
    betas = []
    for i, beta in enumerate(value):
        beta = F._real(beta, owner, f"betas[{i}]")
        if not 0.0 <= beta < 1.0:  # NaN fails too
            raise ValueError(f"{owner}: betas[{i}] must be in [0, 1), got {value[i]!r}")
        betas.append(beta)
    return tuple(betas)


def _check_module(module: Module, owner: str) -> Module:
    if not all(hasattr(module, attr) for attr in ("named_parameters", "trainable_parameters",
                                                  "grads", "zero_grad")):
        raise TypeError(f"{owner}: expected an attnkit.nn.Module, got {type(module).__name__}")
    return module


def _mapping(value: Any, owner: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, collections.abc.Mapping):
        raise TypeError(f"{owner}: {what} must be a dict, got {type(value).__name__}")
    return value


def _same_keys(given: Iterable[object], expected: Iterable[object], owner: str, what: str) -> None:
    """KeyError (as Module.load_state_dict's) listing missing and unexpected keys."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise KeyError(f"{owner}: {what}: " + key_mismatch(missing, unexpected))


# ---------------------------------------------------------------------------
# Optimizers

class Optimizer:
    """The base of SGD, Adam and AdamW: a module, hyperparameters and, per
    parameter name, a state dict ({"step": int, buffer name: array}).

    There are no parameter groups: one set of hyperparameters applies to every
    trainable parameter of the module (freeze what should not train).
    """

    # the names of the arrays in a parameter's state; set by each optimizer
    _buffers: tuple[str, ...] = ()

    def __init__(self, module: Module, **hyperparameters: Any) -> None:
        owner = type(self).__name__
        self._module = _check_module(module, owner)
        if next(iter(module.named_parameters()), None) is None:
            raise ValueError(f"{owner}: the module has no parameters to optimise")
        self._hyper = self._validated(owner, **hyperparameters)
        self._state: dict[str, dict[str, Any]] = {}

    # -- hyperparameters ---------------------------------------------------
    @classmethod
    def _validated(cls, owner: str, **hyperparameters: Any) -> dict[str, Any]:
        """The hyperparameters checked and normalised, lr first (subclasses
        check theirs; the same code checks a loaded state dict's)."""
        raise NotImplementedError

    @property
    def module(self) -> Module:
        """The module whose trainable parameters step() updates."""
        return self._module

    @property
    def lr(self) -> float:
        """The learning rate the next step() uses; schedules set it."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self._hyper["lr"] = _at_least(value, type(self).__name__, "lr")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """A copy of the hyperparameters (only lr can be changed, through .lr)."""
        return dict(self._hyper)

    def __getattr__(self, name: str) -> Any:
        # momentum, betas, eps, weight_decay, ... read as attributes
        hyper = self.__dict__.get("_hyper", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"

    # -- stepping ------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the module's gradients (module.zero_grad())."""
        self._module.zero_grad()

    def step(self) -> None:
        """Update every trainable parameter in place from its gradient.

        Everything is checked before anything is written, so a step that
        raises has changed no parameter.
        """
        work = self._work(f"{type(self).__name__}.step")
        states = [self._state_for(name, param) for name, param, _ in work]
        for (_, param, grad), state in zip(work, states):
            state["step"] += 1
            self._update(param, grad, state)

    def _work(self, owner: str) -> list[tuple[str, _Array, _Array]]:
        """(name, parameter, gradient) for the trainable parameters, checked."""
        grads = self._module.grads(trainable_only=True)
        seen: dict[int, str] = {}
        work = []
        for name, param in self._module.trainable_parameters():
            if id(param) in seen:
                # two names, one array: it would be updated twice
                raise ValueError(f"{owner}: parameters {seen[id(param)]!r} and {name!r} are the "
                                 "same array; shared (tied) parameters are not supported")
            seen[id(param)] = name
            if not isinstance(param, np.ndarray) or param.dtype not in _FLOATS:
                raise TypeError(f"{owner}: parameter {name!r} must be a float32 or float64 array, "
                                f"got {getattr(param, 'dtype', type(param).__name__)}")
            if not param.flags.writeable:
                raise ValueError(f"{owner}: parameter {name!r} is read-only, but optimizers "
                                 "update parameters in place")
            grad = grads.get(name)
            if grad is None:
                raise KeyError(f"{owner}: module.grads() has no gradient for the trainable "
                               f"parameter {name!r}")
            grad = np.asarray(grad)
            if grad.shape != param.shape or grad.dtype != param.dtype:
                raise ValueError(f"{owner}: the gradient of {name!r} is {grad.shape} of "
                                 f"{grad.dtype}, but the parameter is {param.shape} of {param.dtype}")
            work.append((name, param, grad))
        return work

    def _state_for(self, name: str, param: _Array) -> dict[str, Any]:
        state = self._state.get(name)
        if state is None:
            state = self._state[name] = self._new_state(param)
            return state
        for key in self._buffers:
            buffer = state.get(key)
            if buffer is None:
                continue
            if buffer.shape != param.shape:
                raise ValueError(f"{type(self).__name__}.step: the state {key!r} of {name!r} has "
                                 f"shape {buffer.shape}, but the parameter has {param.shape}")
            if buffer.dtype != param.dtype or not buffer.flags.c_contiguous:
                # the module was converted (module.astype) since the last step:
                # state follows the parameter's dtype, as in PyTorch (and the
                # kernels take contiguous state)
                state[key] = np.ascontiguousarray(buffer, dtype=param.dtype)
        return state

    def _new_state(self, param: _Array) -> dict[str, Any]:
        raise NotImplementedError

    def _update(self, param: _Array, grad: _Array, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- state dicts -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: {"optimizer": class name,
        "hyperparameters": {"lr": ..., ...}, "state": {parameter name:
        {"step": int, buffer name: array}}}. The arrays are copies, so later
        steps do not change a saved state dict."""
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": dict(self._hyper),
            "state": {name: {key: value.copy() if isinstance(value, np.ndarray) else value
                             for key, value in state.items()}
                      for name, state in self._state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from state_dict(): the hyperparameters (lr included) and
        each parameter's state are replaced by copies of the saved ones,
        converted to the parameter's dtype. Keys, names, shapes and values
        are checked first; on any error nothing is changed."""
        owner = f"{type(self).__name__}.load_state_dict"
        _mapping(state_dict, owner, "the state dict")
        if state_dict.get("optimizer", type(self).__name__) != type(self).__name__:
            raise ValueError(f"{owner}: the state dict is a {state_dict['optimizer']!r} optimizer's, "
                             f"not a {type(self).__name__}'s")
        _same_keys(state_dict, ("optimizer", "hyperparameters", "state"), owner, "the state dict")
        hyper = _mapping(state_dict["hyperparameters"], owner, "'hyperparameters'")
        _same_keys(hyper, self._hyper, owner, "'hyperparameters'")
        hyper = self._validated(owner, **hyper)
        params = dict(self._module.named_parameters())
        saved = _mapping(state_dict["state"], owner, "'state'")
        unknown = [name for name in saved if name not in params]
        if unknown:
            raise KeyError(f"{owner}: the state dict has state for {', '.join(map(str, unknown))}, "
                           f"which the module does not have; its parameters: {', '.join(params)}")
        state: dict[str, dict[str, Any]] = {}
        for name, entry in saved.items():
            entry = _mapping(entry, owner, f"the state of {name!r}")
            buffers = self._buffers_for(hyper)
            _same_keys(entry, ("step",) + buffers, owner, f"the state of {name!r}")
            new: dict[str, Any] = {"step": _count(entry["step"], owner, f"the step of {name!r}", 0)}
            param = params[name]
            for key in buffers:
                new[key] = self._loaded_buffer(entry[key], param, owner, f"{key!r} of {name!r}")
            state[name] = new
        self._hyper = hyper
        self._state = state

    def _buffers_for(self, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        """The state's buffer names under these hyperparameters."""
        return self._buffers

    def _loaded_buffer(self, value: Any, param: _Array, owner: str, what: str) -> _Array | None:
        value = np.asarray(value)
        if value.shape != param.shape:
            raise ValueError(f"{owner}: {what} has shape {value.shape}, but the parameter "
                             f"has {param.shape}")
        if value.dtype.kind != "f":
            raise TypeError(f"{owner}: {what} must be a float array, got {value.dtype}")
        return np.array(value, dtype=param.dtype, order="C", copy=True)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD.

    For a parameter p with gradient g, at each step:

        g = g + weight_decay * p                              (if weight_decay)
        b = g on the first step, else momentum * b + (1 - dampening) * g
        g = g + momentum * b if nesterov, else b               (if momentum)
        p = p - lr * g

    The module's gradients are read, never changed. nesterov needs
    momentum > 0 and dampening = 0.
    """

    _buffers = ("momentum_buffer",)

    def __init__(self, module: Module, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(module, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    @classmethod
    def _validated(cls, owner: str, lr: Any, momentum: Any,  # type: ignore[override]  # named, not **
                   dampening: Any, weight_decay: Any, nesterov: Any) -> dict[str, Any]:
        hyper = {"lr": _at_least(lr, owner, "lr"),
                 "momentum": _at_least(momentum, owner, "momentum"),
                 "dampening": _finite(dampening, owner, "dampening"),
                 "weight_decay": _at_least(weight_decay, owner, "weight_decay"),
                 "nesterov": F._flag(nesterov, owner, "nesterov")}
        if hyper["nesterov"] and (hyper["momentum"] == 0 or hyper["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening = 0, got "
                             f"momentum={momentum!r} and dampening={dampening!r}")
        return hyper

    def _new_state(self, param: _Array) -> dict[str, Any]:
        # the buffer starts as a copy of the first step's gradient (PyTorch's rule)
        return {"step": 0, "momentum_buffer": None}

    def _loaded_buffer(self, value: Any, param: _Array, owner: str, what: str) -> _Array | None:
        # None: momentum is 0, or the parameter has not been stepped yet
        return None if value is None else super()._loaded_buffer(value, param, owner, what)

    def _update(self, p: _Array, g: _Array, state: dict[str, Any]) -> None:
        h = self._hyper
        lr, momentum, dampening = h["lr"], h["momentum"], h["dampening"]
        d, owned = g, False  # owned: d is a temporary this step may overwrite
        if h["weight_decay"] != 0:
            d = np.multiply(p, h["weight_decay"])
            d += g
            owned = True
        if momentum != 0:
            buf = state["momentum_buffer"]
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d, order="C", copy=True)
            else:
                buf *= momentum
                if dampening == 0:
                    buf += d  # (1 - 0) * d is d exactly: no product needed
                else:
                    buf += np.multiply(d, 1 - dampening)
            if h["nesterov"]:
                t = np.multiply(buf, momentum)
                t += d  # d + momentum * buf
                d, owned = t, True
            else:
                d, owned = buf, False
        if owned:
            d *= lr
            p -= d
        else:
            p -= np.multiply(d, lr)


class Adam(Optimizer):
    """Adam (Kingma and Ba), as torch.optim.Adam; weight_decay is an L2 term
    added to the gradient. For a parameter p with gradient g, at step t
    (counted per parameter, from 1):

        g = g + weight_decay * p                               (if weight_decay)
        m = m + (1 - beta1) * (g - m)                         (torch.lerp)
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v)                                  (if amsgrad; then v_max for v)
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    m, v and v_max start at zero and are kept in the parameter's dtype.
    """

    _buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled = False  # AdamW's decoupled weight decay

    def __init__(self, module: Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        super().__init__(module, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

    @classmethod
    def _validated(cls, owner: str, lr: Any, betas: Any,  # type: ignore[override]  # named, not **
                   eps: Any, weight_decay: Any, amsgrad: Any) -> dict[str, Any]:
        return {"lr": _at_least(lr, owner, "lr"),
                "betas": _betas(betas, owner),
                "eps": _at_least(eps, owner, "eps"),
                "weight_decay": _at_least(weight_decay, owner, "weight_decay"),
                "amsgrad": F._flag(amsgrad, owner, "amsgrad")}

    def _buffers_for(self, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        return self._buffers if hyper["amsgrad"] else self._buffers[:2]

    def _new_state(self, param: _Array) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for key in self._buffers_for(self._hyper):
            state[key] = np.zeros(param.shape, param.dtype)
        return state

    def _update(self, p: _Array, g: _Array, state: dict[str, Any]) -> None:
        """One pass of the C kernel (csrc/optim.c), torch's operations in
        torch's order: attnkit.reference.adam_step is the same in NumPy."""
        h = self._hyper
        beta1, beta2 = h["betas"]
        step = state["step"]
        # the bias corrections in Python floats, as PyTorch computes them
        step_size = h["lr"] / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        _kernels.adam_step(p, state["exp_avg"], state["exp_avg_sq"],
                           state["max_exp_avg_sq"] if h["amsgrad"] else None, _contiguous(g),
                           h["lr"], beta1, beta2, h["eps"], h["weight_decay"], step_size,
                           bias_correction2_sqrt, self._decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as
    torch.optim.AdamW: before Adam's step (without any L2 term),

        p = p * (1 - lr * weight_decay)

    weight_decay defaults to 0.01, as in PyTorch.
    """

    _decoupled = True

    def __init__(self, module: Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, amsgrad: bool = False) -> None:
        super().__init__(module, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)


# ---------------------------------------------------------------------------
# Gradient clipping

def clip_grad_norm(module: Module, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> float:
    """Scale the trainable parameters' gradients in place so that their norm,
    taken over all of them as one vector, is at most max_norm, as
    torch.nn.utils.clip_grad_norm_. Returns the norm before clipping, a float.

        total = (sum over every gradient element of |g|^norm_type)^(1/norm_type)
                (max |g| for norm_type inf)
        g = g * max_norm / (total + 1e-6)   when that factor is below 1

    The norm is computed in float64 whatever the gradients' dtype; the factor
    is applied in the gradient's dtype. Frozen parameters are left out. A
    non-finite total (an inf or NaN gradient) makes the gradients NaN, as in
    PyTorch, so the step after visibly fails; error_if_nonfinite=True raises a
    RuntimeError instead. This works on the module's own gradient arrays
    (module.grads()), which the next optimizer step reads.
    """
    owner = "clip_grad_norm"
    _check_module(module, owner)
    max_norm = F._real(max_norm, owner, "max_norm")
    if not max_norm >= 0:
        raise ValueError(f"{owner}: max_norm must be >= 0, got {max_norm!r}")
    if isinstance(norm_type, str) and norm_type == "inf":
        norm_type = math.inf  # PyTorch accepts the string too
    p = F._real(norm_type, owner, "norm_type")
    if not p > 0:
        raise ValueError(f"{owner}: norm_type must be a positive number or inf, got {norm_type!r}")
    error_if_nonfinite = F._flag(error_if_nonfinite, owner, "error_if_nonfinite")
    all_grads = module.grads(trainable_only=True)
    grads = [all_grads[name] for name, _ in module.trainable_parameters()]
    if not grads:
        return 0.0
    total = _total_norm(grads, p)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"{owner}: the total norm of order {p} of the gradients is {total}, "
                           "so they cannot be clipped; error_if_nonfinite=False clips anyway")
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:  # below 1, or NaN (which PyTorch's clamp passes on)
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN here on purpose
            for grad in grads:
                np.multiply(grad, coef, out=grad)
    return total


def _total_norm(grads: Iterable[_Array], p: float) -> float:
    """The p-norm of all the gradients' elements together, in float64."""
    if p == math.inf:
        return max(float(np.max(np.abs(g))) if g.size else 0.0 for g in grads)
    total = 0.0
    for g in grads:
        x = np.abs(g, dtype=np.float64)
        if p == 2:
            np.square(x, out=x)
        elif p != 1:
            np.power(x, p, out=x)
        total += float(x.sum())  # NumPy's pairwise sum; no BLAS threads
    return math.sqrt(total) if p == 2 else total ** (1.0 / p)


# ---------------------------------------------------------------------------
# Learning-rate schedules

class LRSchedule:
    """The base of the schedules: lr = base_lr * factor(last_step), as
    PyTorch's LambdaLR computes it.

    base_lr is the optimizer's lr when the schedule is made; the schedule then
    sets optimizer.lr to lr_at(0), the lr of the first optimizer step, and each
    step() (called after optimizer.step()) counts one more step and sets the
    next lr. last_step is PyTorch's last_epoch.
    """

    _settings: tuple[str, ...] = ()  # the names of the schedule's settings, for state dicts

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected an attnkit.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0

    def factor(self, step: int) -> float:
        """The multiplier of base_lr after `step` calls of step()."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        """The lr after `step` calls of step()."""
        return self.base_lr * self.factor(step)

    def step(self) -> None:
        """Advance one step and set the optimizer's lr."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The lr the schedule last set (a float: there is one lr, no groups)."""
        return self._last_lr

    def _apply(self) -> None:
        self._last_lr = self.lr_at(self.last_step)
        self.optimizer.lr = self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """{"schedule": class name, "base_lr", "last_step", and the settings}."""
        state: dict[str, Any] = {"schedule": type(self).__name__, "base_lr": self.base_lr,
                 "last_step": self.last_step}
        state.update({name: getattr(self, name) for name in self._settings})
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: take the saved base_lr, step count and settings, and set
        the optimizer's lr to the saved step's. Checked first; on any error
        nothing changes."""
        owner = f"{type(self).__name__}.load_state_dict"
        _mapping(state_dict, owner, "the state dict")
        if state_dict.get("schedule", type(self).__name__) != type(self).__name__:
            raise ValueError(f"{owner}: the state dict is a {state_dict['schedule']!r} schedule's, "
                             f"not a {type(self).__name__}'s")
        _same_keys(state_dict, ("schedule", "base_lr", "last_step") + self._settings, owner,
                   "the state dict")
        base_lr = _at_least(state_dict["base_lr"], owner, "base_lr")
        last_step = _count(state_dict["last_step"], owner, "last_step", 0)
        settings = self._validated(owner, base_lr, **{k: state_dict[k] for k in self._settings})
        self.base_lr, self.last_step = base_lr, last_step
        self.__dict__.update(settings)
        self._apply()

    @classmethod
    def _validated(cls, owner: str, base_lr: float, **settings: Any) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._settings)
        return f"{type(self).__name__}({args}, base_lr={self.base_lr!r}, last_step={self.last_step})"


class LinearWarmupCosine(LRSchedule):
    """Linear warmup from 0 to the base lr, then a half cosine down to min_lr:
    transformers' get_cosine_schedule_with_warmup (and, with min_lr,
    get_cosine_with_min_lr_schedule_with_warmup), the same floating-point
    operations. After n = last_step calls of step(), with W = warmup_steps,
    T = total_steps and r = min_lr / base_lr:

        n < W:  lr = base_lr * n / W
        n >= W: lr = base_lr * (c * (1 - r) + r),
                c = (1 + cos(pi * min(1, (n - W) / max(1, T - W)))) / 2

    So the first optimizer step (n = 0) has lr 0 when W > 0, the lr peaks at
    base_lr at n = W and reaches min_lr at n = T (at n = T + 1 when W = T, as
    in transformers). After that it stays at min_lr, where transformers'
    formula would turn back up.
    """

    _settings = ("warmup_steps", "total_steps", "min_lr")
    warmup_steps: int
    total_steps: int
    min_lr: float

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_lr: float = 0.0) -> None:
        super().__init__(optimizer)
        self.__dict__.update(self._validated(type(self).__name__, self.base_lr,
                                             warmup_steps=warmup_steps, total_steps=total_steps,
                                             min_lr=min_lr))
        self._apply()

    @classmethod
    def _validated(cls, owner: str, base_lr: float, warmup_steps: Any,  # type: ignore[override]
                   total_steps: Any, min_lr: Any) -> dict[str, Any]:   # (named, not **)
        warmup_steps = _count(warmup_steps, owner, "warmup_steps", 0)
        total_steps = _count(total_steps, owner, "total_steps", 1)
        if warmup_steps > total_steps:
            raise ValueError(f"{owner}: warmup_steps ({warmup_steps}) must not exceed total_steps "
                             f"({total_steps})")
        min_lr = _at_least(min_lr, owner, "min_lr")
        if min_lr > base_lr:
            raise ValueError(f"{owner}: min_lr ({min_lr!r}) must not exceed the optimizer's lr "
                             f"({base_lr!r})")
        return {"warmup_steps": warmup_steps, "total_steps": total_steps, "min_lr": min_lr}

    def factor(self, step: int) -> float:
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        rate = self.min_lr / self.base_lr if self.base_lr > 0 else 0.0
        return max(0.0, cosine * (1 - rate) + rate)


class InverseSqrt(LRSchedule):
    """The original Transformer's schedule (Vaswani et al. 2017, eq. 3): a
    linear warmup, then decay as the inverse square root of the step. The
    lr of the n-th optimizer step (n = last_step + 1: they count from 1, so
    no step has lr 0), with W = warmup_steps:

        lr = base_lr * scale * min(n^-0.5, n * W^-1.5)

    The scale convention:
      - d_model given: scale = d_model^-0.5, as in the paper, so base_lr (the
        optimizer's lr) is the paper's constant factor: 1.0 reproduces the
        paper's schedule (peak d_model^-0.5 * W^-0.5 at n = W; the Annotated
        Transformer's `factor`).
      - d_model None: scale = W^0.5, so the lr peaks at exactly base_lr at
        n = W and decays as base_lr * sqrt(W / n) after (fairseq's
        inverse_sqrt, warming up from 0).
    """

    _settings = ("warmup_steps", "d_model")
    warmup_steps: int
    d_model: int | None

    def __init__(self, optimizer: Optimizer, warmup_steps: int, d_model: int | None = None) -> None:
        super().__init__(optimizer)
        self.__dict__.update(self._validated(type(self).__name__, self.base_lr,
                                             warmup_steps=warmup_steps, d_model=d_model))
        self._apply()

    @classmethod
    def _validated(cls, owner: str, base_lr: float, warmup_steps: Any,  # type: ignore[override]
                   d_model: Any) -> dict[str, Any]:   # (named, not **)
        warmup_steps = _count(warmup_steps, owner, "warmup_steps", 1)
        d_model = None if d_model is None else _count(d_model, owner, "d_model", 1)
        return {"warmup_steps": warmup_steps, "d_model": d_model}

    @property
    def scale(self) -> float:
        """The factor before the warmup and decay terms: d_model^-0.5, or
        warmup_steps^0.5 without d_model."""
        return self.d_model ** -0.5 if self.d_model is not None else self.warmup_steps ** 0.5

    def factor(self, step: int) -> float:
        n = step + 1
        return self.scale * min(n ** -0.5, n * self.warmup_steps ** -1.5)
