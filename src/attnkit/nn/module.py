"""Module: the base of every layer in attnkit.nn.

A module holds its parameters as plain NumPy arrays in attributes, and its
submodules likewise, so a user reads and sets them directly
(`mha.out_proj.weight[:] = ...`). Names, nesting and state-dict keys follow
PyTorch's, so `module.load_state_dict({k: v.numpy() for k, v in
torch_module.state_dict().items()})` loads a PyTorch model's weights.

Training without autograd: each module writes its own backward. In training
mode (`module.train()`, the default, as PyTorch's) forward keeps what the
gradient needs; `module.backward(grad_output)` then returns the gradient of
the forward's array input(s) and adds the parameters' gradients into
`module.grads()`, a module passing the gradient through its children in
reverse order so that each child's backward runs. In eval mode forward keeps
nothing and takes the fused inference paths. `freeze` marks parameters that
get no gradient (and cost no gradient work); `trainable_parameters` lists the
rest, which attnkit.optim updates.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from .. import functional as F

if TYPE_CHECKING:
    import os

    import numpy.typing as npt

    _Self = TypeVar("_Self", bound="Module")

__all__ = ["Module", "Sequential", "ModuleList"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def key_mismatch(missing: Iterable[object], unexpected: Iterable[object]) -> str:
    """"missing keys: ...; unexpected keys: ...", the part of a state-dict
    error that lists them (Module's and the optimisers' load_state_dict)."""
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(map(str, missing))}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(map(str, unexpected))}")
    return "; ".join(parts)


def _as_numpy(value: Any, key: str) -> npt.NDArray[Any]:
    """A state-dict value as an ndarray: NumPy arrays, anything with
    __array__, and PyTorch tensors (detached, moved to the CPU) without
    importing PyTorch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # pragma: no cover - what np.asarray raises varies
        raise TypeError(f"state dict entry {key!r}: cannot make an array of "
                        f"{type(value).__name__}: {e}") from None


class Module:
    """Base class: parameters, buffers and submodules in registration order."""

    # set in __init__ with object.__setattr__ (declared here for type checkers)
    training: bool
    _parameters: collections.OrderedDict[str, npt.NDArray[Any] | None]
    _buffers: collections.OrderedDict[str, npt.NDArray[Any] | None]
    _modules: collections.OrderedDict[str, Module]
    _frozen: set[str]
    _grads: dict[str, npt.NDArray[Any]]
    _saved: Any                     # a tuple, or None (a type per module: Any)

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_modules", collections.OrderedDict())
        object.__setattr__(self, "_frozen", set())
        object.__setattr__(self, "_grads", {})        # parameter name -> accumulated gradient
        object.__setattr__(self, "_saved", None)      # what the last training forward kept
        object.__setattr__(self, "training", True)

    # -- registration -------------------------------------------------------
    def register_parameter(self, name: str, value: npt.NDArray[Any] | None) -> None:
        """Add a parameter (an ndarray, or None for an absent optional one)."""
        self._parameters[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: npt.NDArray[Any] | None) -> None:
        """Add state that is saved but not a parameter (BatchNorm's running stats)."""
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Module):
            if "_modules" not in self.__dict__:
                raise AttributeError("call Module.__init__() before assigning submodules")
            self._modules[name] = value
        elif name in self.__dict__.get("_parameters", {}):
            value = self._checked_parameter(name, value)
            self._parameters[name] = value
        elif name in self.__dict__.get("_buffers", {}):
            self._buffers[name] = value
        elif name in self.__dict__.get("_modules", {}) and value is None:
            del self._modules[name]
        object.__setattr__(self, name, value)

    def _checked_parameter(self, name: str, value: Any) -> npt.NDArray[Any] | None:
        """A parameter keeps its shape and dtype when a user assigns to it."""
        old = self._parameters[name]
        if value is None or old is None:
            return value
        value = np.asarray(value)
        if value.shape != old.shape:
            raise ValueError(f"{type(self).__name__}.{name}: expected shape {old.shape}, "
                             f"got {value.shape}")
        return np.ascontiguousarray(value, dtype=old.dtype)

    # -- traversal ----------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted name, module) for this module ("") and every submodule."""
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, npt.NDArray[Any]]]:
        """(dotted name, array) for every parameter, this module's first."""
        for name, value in self._parameters.items():
            if value is not None:
                yield prefix + name, value
        for name, module in self._modules.items():
            yield from module.named_parameters(f"{prefix}{name}.")

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, npt.NDArray[Any]]]:
        """(dotted name, array) for every buffer, this module's first."""
        for name, value in self._buffers.items():
            if value is not None:
                yield prefix + name, value
        for name, module in self._modules.items():
            yield from module.named_buffers(f"{prefix}{name}.")

    def parameters(self) -> list[npt.NDArray[Any]]:
        """Every parameter array, in named_parameters' order."""
        return [value for _, value in self.named_parameters()]

    def children(self) -> list[Module]:
        """The direct submodules, in registration order."""
        return list(self._modules.values())

    # -- counting and freezing ----------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        """How many numbers the parameters hold (buffers not counted)."""
        names = self._frozen_names() if trainable_only else set()
        return sum(int(v.size) for n, v in self.named_parameters() if n not in names)

    def freeze(self: _Self, *names: str) -> _Self:
        """Mark parameters as frozen, by dotted name or prefix ("encoder.layers.0");
        with no names, all of them. Returns self."""
        self._set_frozen(names, True)
        return self

    def unfreeze(self: _Self, *names: str) -> _Self:
        """Undo freeze: the named parameters (all, with no names) take gradients again."""
        self._set_frozen(names, False)
        return self

    def _set_frozen(self, names: tuple[str, ...], frozen: bool) -> None:
        all_names = [n for n, _ in self.named_parameters()]
        chosen = set(all_names) if not names else set()
        for prefix in names:
            matched = [n for n in all_names if n == prefix or n.startswith(prefix + ".")]
            if not matched:
                raise KeyError(f"no parameter is named {prefix!r} or starts with it; "
                               f"parameters: {', '.join(all_names)}")
            chosen.update(matched)
        for module_prefix, module in self.named_modules():
            for name in list(module._parameters):
                full = (module_prefix + "." if module_prefix else "") + name
                if full in chosen:
                    (module._frozen.add if frozen else module._frozen.discard)(name)

    def _frozen_names(self) -> set[str]:
        return {(p + "." if p else "") + n for p, m in self.named_modules() for n in m._frozen}

    def trainable_parameters(self) -> list[tuple[str, npt.NDArray[Any]]]:
        """(name, array) for the parameters that are not frozen."""
        frozen = self._frozen_names()
        return [(n, v) for n, v in self.named_parameters() if n not in frozen]

    # -- modes and dtype -----------------------------------------------------
    def train(self: _Self, mode: bool = True) -> _Self:
        """Training mode (True) or evaluation mode, for this module and every
        submodule. Leaving training mode drops what forward kept for backward."""
        mode = F._flag(mode, type(self).__name__, "train(mode)")
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
            if not mode:
                object.__setattr__(module, "_saved", None)
        return self

    def eval(self: _Self) -> _Self:
        """Evaluation mode: train(False)."""
        return self.train(False)

    def astype(self: _Self, dtype: npt.DTypeLike) -> _Self:
        """Convert every floating parameter and buffer to float32 or float64, in place."""
        dtype = np.dtype(dtype)
        if dtype not in _FLOATS:
            raise TypeError(f"modules compute in float32 or float64, not {dtype}")
        for _, module in self.named_modules():
            object.__setattr__(module, "_dtype", dtype)
            for store in (module._parameters, module._buffers):
                for name, value in store.items():
                    if value is not None and value.dtype.kind == "f":
                        converted = np.ascontiguousarray(value, dtype=dtype)
                        store[name] = converted
                        object.__setattr__(module, name, converted)
        return self

    def _parameter_dtype(self) -> np.dtype[Any] | None:
        """The dtype of the first parameter (named_parameters gives the
        module's own first, so this stops there), or None when there is none."""
        for _, value in self.named_parameters():
            return value.dtype
        return None

    @property
    def dtype(self) -> np.dtype[Any]:
        """The parameters' dtype; for a module without any, the one it was made with."""
        dtype = self._parameter_dtype()
        return dtype if dtype is not None else self.__dict__.get("_dtype", np.dtype(np.float32))

    # -- state dicts -----------------------------------------------------------
    def state_dict(self) -> collections.OrderedDict[str, npt.NDArray[Any]]:
        """name -> array, parameters and buffers, in PyTorch's order and names.
        The arrays are the module's own (not copies), as PyTorch's tensors are."""
        state: collections.OrderedDict[str, npt.NDArray[Any]] = collections.OrderedDict()
        self._fill_state(state, "")
        return state

    def _fill_state(self, state: dict[str, npt.NDArray[Any]], prefix: str) -> None:
        for name, value in self._parameters.items():
            if value is not None:
                state[prefix + name] = value
        for name, value in self._buffers.items():
            if value is not None:
                state[prefix + name] = value
        for name, module in self._modules.items():
            module._fill_state(state, f"{prefix}{name}.")

    def load_state_dict(self, state_dict: Mapping[str, Any],
                        strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy values into the parameters and buffers, converting to their dtype.

        Values may be NumPy arrays, PyTorch tensors or anything array-like.
        strict=True (PyTorch's default) refuses missing and unexpected keys;
        a shape that does not match is always an error naming the key.
        Returns (missing_keys, unexpected_keys)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict for {type(self).__name__}: "
                           + key_mismatch(missing, unexpected))
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = _as_numpy(state_dict[key], key)
            if value.shape != target.shape:
                raise ValueError(f"load_state_dict: {key!r} has shape {value.shape} in the "
                                 f"state dict but {target.shape} in the module")
            if value.dtype.kind not in "fiub":
                raise TypeError(f"load_state_dict: {key!r} has dtype {value.dtype}")
            target[...] = value  # in place: arrays users hold stay the module's
        return missing, unexpected

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state dict to a .npz or .safetensors file."""
        from ..io import save_state_dict
        save_state_dict(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str], strict: bool = True) -> tuple[list[str], list[str]]:
        """Read a state dict from a .npz or .safetensors file into the module."""
        from ..io import load_state_dict
        return self.load_state_dict(load_state_dict(path), strict=strict)

    # -- calling -------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The layer's computation; each subclass defines it (module(...) calls it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # what a forward kept for backward is not part of the model: a pickle
        # or a deep copy carries parameters, buffers and gradients, not activations
        state = self.__dict__.copy()
        state["_saved"] = None
        return state

    # -- gradients -------------------------------------------------------------
    def backward(self, grad_output: Any) -> Any:
        """The gradient of the last training-mode forward call's array input
        (a tuple in argument order when forward took several), given
        grad_output, the gradient of its output. The parameters' gradients
        are added into grads(): they accumulate over calls until zero_grad().
        Calling backward twice after one forward adds the parameters'
        gradients twice, as two losses of the same output would."""
        name = type(self).__name__
        if not self.training:
            raise RuntimeError(f"{name}.backward: the module is in eval mode, whose forward keeps "
                               "nothing for backward; call module.train() before the forward")
        if self._saved is None:
            raise RuntimeError(f"{name}.backward: there is no training-mode forward call to take "
                               "the gradient of; call the module on an input first")
        return self._backward(grad_output)

    def _backward(self, grad_output: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _save(self, *saved: Any) -> None:
        """Keep what backward needs, in training mode only (so eval-mode
        inference holds on to nothing)."""
        if self.training:
            object.__setattr__(self, "_saved", saved)

    def _check_grad(self, grad: npt.ArrayLike, shape: Iterable[int], dtype: npt.DTypeLike,
                    what: str = "grad_output") -> npt.NDArray[Any]:
        """grad as an array of the forward's output's shape and dtype."""
        name = type(self).__name__
        grad = F._as_float_array(grad, f"{name}.backward", what)
        if grad.shape != tuple(shape):
            raise ValueError(f"{name}.backward: {what} has shape {grad.shape}, but the forward's "
                             f"output was {tuple(shape)}")
        return grad if grad.dtype == dtype else grad.astype(dtype)

    def _wants_grad(self, name: str) -> bool:
        """Whether parameter `name` (of this module) takes a gradient."""
        return self._parameters.get(name) is not None and name not in self._frozen

    def _grad_buffer(self, name: str) -> npt.NDArray[Any] | Literal[False]:
        """The array parameter `name`'s gradient accumulates in (made zero on
        first use), or False when it is frozen or absent: F.linear_backward's
        convention for "skip this one"."""
        if not self._wants_grad(name):
            return False
        buffer = self._grads.get(name)
        value: npt.NDArray[Any] = self._parameters[name]  # type: ignore[assignment]  # not None: _wants_grad
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = self._grads[name] = np.zeros(value.shape, value.dtype)
        return buffer

    def _accumulate(self, name: str, grad: npt.ArrayLike | None) -> None:
        """grads()[name] += grad, unless the parameter is frozen."""
        buffer = self._grad_buffer(name)
        if buffer is not False and grad is not None:
            buffer += grad

    def grads(self, trainable_only: bool = False) -> collections.OrderedDict[str, npt.NDArray[Any]]:
        """name -> gradient, for exactly the parameters of named_parameters(),
        each of its parameter's shape and dtype: what backward calls have
        accumulated since zero_grad() (zeros where none has; a frozen
        parameter's stays zero). The arrays are the module's own.
        trainable_only=True leaves the frozen ones out (what an optimiser
        reads, without making their zeros)."""
        out: collections.OrderedDict[str, npt.NDArray[Any]] = collections.OrderedDict()
        for prefix, module in self.named_modules():
            for name, value in module._parameters.items():
                if value is None:
                    continue
                grad = module._grad_buffer(name)           # kept, so that later
                if grad is False:                          # backward calls add to it
                    if trainable_only:
                        continue
                    grad = np.zeros(value.shape, value.dtype)
                out[(prefix + "." if prefix else "") + name] = grad
        return out

    def zero_grad(self) -> None:
        """Forget the accumulated gradients (of every submodule too)."""
        for _, module in self.named_modules():
            module._grads.clear()

    def extra_repr(self) -> str:
        """The arguments repr shows after the class name."""
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """Submodules named 0, 1, 2, ... (as PyTorch's, for state-dict keys)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self: _Self, module: Module) -> _Self:
        """Add a module at the end, named by its index."""
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, index: int) -> Any:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Modules applied one after another; backward runs them in reverse."""

    def forward(self, x: Any) -> Any:
        """Each module applied in turn to x (for layers of arrays, (N, *) in, (N, *) out)."""
        for module in self:
            x = module(x)
        self._save(True)
        return x

    def _backward(self, grad: Any) -> Any:
        for module in reversed(list(self)):
            grad = module.backward(grad)
        return grad


def _check_float(x: npt.ArrayLike, what: str) -> npt.NDArray[Any]:
    """x as a float32/float64 array (the functional layer's rules)."""
    return F._as_float_array(x, what, "input")
