"""What bench/ measures: the cases (an operation on one float32 shape) and the
contenders that compute them. Shared by the pytest benchmarks and ratios.py.

Every case works over the last axis of a float32 (rows, cols) array:
  softmax     attnkit.softmax(x)
  layer_norm  attnkit.layer_norm(x, cols, weight, bias), eps 1e-5
and every contender computes the same thing in float32, allocating its result:
  attnkit  the C kernels
  numpy    attnkit.reference computed in float32: plain NumPy, a fair baseline
  torch    torch.softmax / torch.nn.functional.layer_norm on torch.from_numpy
           views of the same arrays (only when torch can be imported)

Bytes moved count what the operation must read and write at the least
(x and the result, plus weight and bias), the same for every contender, so
GB/s compares like with like; NumPy's temporaries are not counted.
"""
import functools

import numpy as np

import attnkit
from attnkit import reference

try:
    import torch
except ImportError:
    torch = None

EPS = 1e-5
LARGE_SHAPES = [(4096, 1024), (12288, 128), (256, 32768), (8192, 768), (128, 384)]
SMALL_SHAPE = (1, 64)  # what one call costs when there is next to nothing to compute
SHAPES = {
    "softmax": LARGE_SHAPES + [SMALL_SHAPE],
    "layer_norm": LARGE_SHAPES,
}
CONTENDERS = ["attnkit", "numpy", "torch"]


def shape_id(shape):
    return "x".join(str(d) for d in shape)


def available(contender):
    return contender != "torch" or torch is not None


def versions():
    """One line naming what is being compared."""
    parts = [f"attnkit {attnkit.__version__} ({attnkit.simd_path()})", f"numpy {np.__version__}"]
    parts.append(f"torch {torch.__version__}" if torch is not None else "torch not installed")
    return ", ".join(parts)


def pin_threads(n):
    """Let attnkit and torch use n threads (NumPy's elementwise maths uses one)."""
    attnkit.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


class Case:
    """One operation on one shape: its inputs, made once, and its references."""

    def __init__(self, op, shape, seed=0):
        if op not in SHAPES:
            raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(SHAPES)}")
        rng = np.random.default_rng(seed)
        rows, cols = shape
        self.op = op
        self.shape = tuple(shape)
        self.name = f"{op} {shape_id(shape)}"
        self.x = (rng.standard_normal(shape) * 3).astype(np.float32)  # (rows, cols)
        self.weight = self.bias = None
        bytes_moved = 2 * self.x.nbytes  # read x, write the result
        if op == "layer_norm":
            self.weight = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)  # (cols)
            self.bias = (0.1 * rng.standard_normal(cols)).astype(np.float32)  # (cols)
            bytes_moved += self.weight.nbytes + self.bias.nbytes
        self.bytes_moved = bytes_moved

    def reference(self, dtype):
        """attnkit.reference's result, computed in `dtype`."""
        if self.op == "softmax":
            return reference.softmax(self.x, dtype=dtype)
        return reference.layer_norm(self.x, self.shape[-1], self.weight, self.bias, EPS,
                                    dtype=dtype)

    def function(self, contender):
        """A callable of no arguments that computes the case with `contender`."""
        x, w, b, cols = self.x, self.weight, self.bias, self.shape[-1]
        if contender == "attnkit":
            if self.op == "softmax":
                return lambda: attnkit.softmax(x)
            return lambda: attnkit.layer_norm(x, cols, w, b, EPS)
        if contender == "numpy":
            if self.op == "softmax":
                return lambda: reference.softmax(x, dtype=np.float32)
            return lambda: reference.layer_norm(x, cols, w, b, EPS, dtype=np.float32)
        if contender == "torch":
            if torch is None:
                raise RuntimeError("torch is not installed")
            tx = torch.from_numpy(x)  # views: no copies inside the timing
            if self.op == "softmax":
                return lambda: torch.softmax(tx, dim=-1)
            tw, tb = torch.from_numpy(w), torch.from_numpy(b)
            return lambda: torch.nn.functional.layer_norm(tx, (cols,), tw, tb, EPS)
        raise ValueError(f"unknown contender {contender!r}; expected one of {', '.join(CONTENDERS)}")

    @functools.cached_property
    def _float64_reference(self):
        return self.reference(np.float64)

    @functools.cached_property
    def _numpy_float32_error(self):
        return _max_abs_diff(self.reference(np.float32), self._float64_reference)

    def check(self, result):
        """How far a contender's result is from the float64 reference.

        max_abs_err: the largest absolute error.
        within_rule: whether it is within the project's accuracy rule, at most
            4 x the error of NumPy in float32 + 4 float32 eps x the largest |value|.
        """
        result = np.asarray(result.numpy() if torch is not None and isinstance(result, torch.Tensor)
                            else result)
        ref = self._float64_reference
        error = _max_abs_diff(result, ref)
        bound = 4 * self._numpy_float32_error + 4 * np.finfo(np.float32).eps * float(np.max(np.abs(ref)))
        return {"max_abs_err": error, "within_rule": bool(error <= bound)}


def _max_abs_diff(a, ref):
    if a.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - ref)))


@functools.lru_cache(maxsize=1)
def get_case(op, shape):
    """The Case for (op, shape), made once while the same one is asked for in a row."""
    return Case(op, shape)
