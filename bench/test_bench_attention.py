"""scaled_dot_product_attention, issue 3's groups: attnkit, NumPy and torch side by side.

GFLOP/s in extra_info counts 4 B H E flops per (query, key) pair computed
(half the pairs, about, when causal). The NumPy contender materialises the
(L, S) scores; for the causal L4096 group that is 0.5 GB a head.
"""
import pytest

import contenders


@pytest.mark.parametrize("contender", contenders.CONTENDERS)
@pytest.mark.parametrize("group", [g[0] for g in contenders.ATTENTION_GROUPS])
def test_attention(run_case, group, contender):
    run_case("attention", group, contender)
