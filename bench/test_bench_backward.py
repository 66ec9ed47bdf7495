"""The backwards of softmax, log_softmax and layer_norm, float32, last axis:
attnkit, NumPy and torch side by side. bench/backward.py runs the same calls
with each contender in a process of its own, which is the comparison to
quote; here all run in pytest-benchmark's process."""
import pytest

from backward import OPS, SHAPES, make_call


@pytest.mark.parametrize("contender", ["attnkit", "numpy", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_backward(benchmark, threads, op, shape, contender):
    if contender == "torch":
        pytest.importorskip("torch")
    call = make_call(contender, op, *shape, threads)
    rows, cols = shape
    benchmark.extra_info["bytes_moved"] = 3 * rows * cols * 4   # grad, y (or x), dx
    benchmark(call)
