"""layer_norm, float32, with weight and bias, over the last dimension:
attnkit, NumPy and torch side by side."""
import pytest

import contenders


@pytest.mark.parametrize("contender", contenders.CONTENDERS)
@pytest.mark.parametrize("shape", contenders.SHAPES["layer_norm"], ids=contenders.shape_id)
def test_layer_norm(run_case, shape, contender):
    run_case("layer_norm", shape, contender)
