"""What bench/ measures: the cases (an operation on one float32 shape) and the
contenders that compute them. Shared by the pytest benchmarks and ratios.py.

Attention cases (AttentionCase, ATTENTION_GROUPS) are the groups of issue 3:
scaled_dot_product_attention on (B, H, L, S, E), plain or causal, float32 or
float64, measured in GFLOP/s (4 B H E x the (query, key) pairs computed).

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
import os

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


# ---------------------------------------------------------------------------
# Attention

ATTENTION_GROUPS = [
    # name, (B, H, L, S, E), causal, dtype
    ("sdpa B1 H12 L128 E64", (1, 12, 128, 128, 64), False, np.float32),
    ("sdpa B8 H12 L128 E64", (8, 12, 128, 128, 64), False, np.float32),
    ("sdpa B1 H8 L1024 E64", (1, 8, 1024, 1024, 64), False, np.float32),
    ("sdpa causal B1 H8 L1024 E64", (1, 8, 1024, 1024, 64), True, np.float32),
    ("sdpa causal B1 H8 L4096 E64", (1, 8, 4096, 4096, 64), True, np.float32),
    ("sdpa decode B1 H32 L1 S4096 E128", (1, 32, 1, 4096, 128), False, np.float32),
    ("sdpa float64 B1 H8 L1024 E64", (1, 8, 1024, 1024, 64), False, np.float64),
]


class AttentionCase:
    """One attention group: its inputs, made once, and its references."""

    def __init__(self, name, dims, causal, dtype, seed=0):
        rng = np.random.default_rng(seed)
        B, H, L, S, E = dims
        self.name, self.dims, self.causal, self.dtype = name, dims, causal, np.dtype(dtype)
        self.shape = dims
        self.q = rng.standard_normal((B, H, L, E)).astype(dtype)  # (B, H, L, E)
        self.k = rng.standard_normal((B, H, S, E)).astype(dtype)  # (B, H, S, E)
        self.v = rng.standard_normal((B, H, S, E)).astype(dtype)  # (B, H, S, E)
        pairs = L * S if not causal else sum(min(i + 1, S) for i in range(L))
        self.flops = 4 * B * H * E * pairs  # q @ k^T and p @ v, 2 flops a multiply-add
        self.bytes_moved = self.q.nbytes + self.k.nbytes + self.v.nbytes + self.q.nbytes

    def reference(self, dtype):
        return reference.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal,
                                                      dtype=dtype)[0]

    def function(self, contender):
        q, k, v, causal = self.q, self.k, self.v, self.causal
        if contender == "attnkit":
            return lambda: attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if contender == "numpy":
            dtype = self.dtype.type
            return lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                  dtype=dtype)[0]
        if contender == "torch":
            if torch is None:
                raise RuntimeError("torch is not installed")
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return lambda: sdpa(tq, tk, tv, is_causal=causal)
        raise ValueError(f"unknown contender {contender!r}; expected one of {', '.join(CONTENDERS)}")

    @functools.cached_property
    def _high_reference(self):
        return self.reference(np.float64 if self.dtype == np.float32 else np.longdouble)

    @functools.cached_property
    def _naive_error(self):
        return _max_abs_diff(self.reference(self.dtype.type), self._high_reference)

    def check(self, result):
        """max_abs_err against the higher-precision reference, and whether it is
        within the rule (4 x the naive error + 4 eps x the largest |value|)."""
        result = np.asarray(result.numpy() if torch is not None and isinstance(result, torch.Tensor)
                            else result)
        ref = self._high_reference
        error = _max_abs_diff(result, ref)
        bound = 4 * self._naive_error + 4 * np.finfo(self.dtype).eps * float(np.max(np.abs(ref)))
        return {"max_abs_err": error, "within_rule": bool(error <= bound)}


@functools.lru_cache(maxsize=1)
def get_attention_case(name):
    for group in ATTENTION_GROUPS:
        if group[0] == name:
            return AttentionCase(*group)
    raise ValueError(f"unknown attention group {name!r}")


def numpy_matmul_rate(n=2048, repeats=5):
    """NumPy's float32 matmul of n x n on one thread, in GFLOP/s (a subprocess,
    so that its BLAS can be held to one thread whatever this process does)."""
    import subprocess
    import sys
    code = (
        "import numpy as np, timeit\n"
        f"a = np.random.default_rng(0).standard_normal(({n}, {n})).astype(np.float32)\n"
        f"t = sorted(timeit.repeat(lambda: a @ a, number=1, repeat={repeats}))[{repeats} // 2]\n"
        f"print(2 * {n}**3 / t / 1e9)\n"
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout)
