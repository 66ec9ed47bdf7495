"""Attention forward + backward (a training step's attention), the forward's
groups: attnkit and torch side by side. bench/attention_backward.py runs the
same steps with each contender in a process of its own, which is the
comparison to quote; here both run in pytest-benchmark's process."""
import pytest

from attention_backward import GROUPS, make_step


@pytest.mark.parametrize("contender", ["attnkit", "torch"])
@pytest.mark.parametrize("group", GROUPS, ids=[g[0] for g in GROUPS])
def test_attention_forward_backward(benchmark, threads, group, contender):
    if contender == "torch":
        pytest.importorskip("torch")
    name, B, H, L, S, E, causal, dtype = group
    step = make_step(contender, B, H, L, S, E, causal, dtype, threads)
    benchmark.extra_info["flops"] = 14 * B * H * L * S * E // (2 if causal else 1)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
