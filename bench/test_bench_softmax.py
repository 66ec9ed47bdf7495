"""softmax, float32, over the last axis: attnkit, NumPy and torch side by side."""
import pytest

import contenders


@pytest.mark.parametrize("contender", contenders.CONTENDERS)
@pytest.mark.parametrize("shape", contenders.SHAPES["softmax"], ids=contenders.shape_id)
def test_softmax(run_case, shape, contender):
    run_case("softmax", shape, contender)
