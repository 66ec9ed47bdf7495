"""One training step of a whole model (bench/train.py's groups): attnkit and
torch side by side. bench/train.py runs the same steps with each contender
in a process of its own, which is the comparison to quote; here both run in
pytest-benchmark's process."""
import pytest

from train import GROUPS, make_step


@pytest.mark.parametrize("contender", ["attnkit", "torch"])
@pytest.mark.parametrize("group", GROUPS)
def test_training_step(benchmark, threads, group, contender):
    if contender == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    step = make_step(contender, group, threads)
    benchmark.extra_info["group"] = group
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
