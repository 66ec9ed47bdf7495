"""attnkit.plot draws what it is given (the pixels' data are the weights,
the labels the tokens), says clearly what it wants, and importing attnkit
never imports matplotlib."""
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from attnkit import nn, plot  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_heatmap_shows_the_weights_and_the_tokens():
    w = np.random.default_rng(0).dirichlet(np.ones(4), size=3)             # (3, 4), rows sum to 1
    ax = plot.attention_heatmap(w, query_tokens=["a", "b", "c"], key_tokens=list("wxyz"),
                                title="one head", annotate=True)
    np.testing.assert_array_equal(ax.images[0].get_array(), w)
    assert [t.get_text() for t in ax.get_xticklabels()] == list("wxyz")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "one head" and len(ax.texts) == 12


def test_heatmap_of_self_attention_labels_both_axes_with_the_tokens():
    ax = plot.attention_heatmap(np.eye(3), query_tokens=["x", "y", "z"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]


def test_grid_draws_every_layer_and_head():
    rng = np.random.default_rng(1)
    attentions = [rng.dirichlet(np.ones(5), size=(2, 5)) for _ in range(3)]    # 3 layers of (2, 5, 5)
    fig = plot.attention_grid(attentions, tokens=list("abcde"), title="all heads")
    assert len(fig.axes) == 6
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), attentions[1][1])  # layer 1, head 1
    fig = plot.attention_grid(np.stack(attentions), layers=[2], heads=[0])
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), attentions[2][0])


def test_grid_of_a_real_multi_head_attention():
    m = nn.MultiHeadAttention(8, 2, batch_first=True, rng=np.random.default_rng(2)).eval()
    x = np.random.default_rng(3).standard_normal((1, 4, 8)).astype(np.float32)
    _, weights = m(x, x, x, average_attn_weights=False)                      # (1, 2, 4, 4)
    fig = plot.attention_grid(weights[0], tokens=["I", "saw", "a", "cat"])
    assert len(fig.axes) == 2


def test_positional_encoding_heatmap():
    table = nn.sinusoidal_positional_encoding(16, 8)
    ax = plot.positional_encoding_heatmap(table)
    np.testing.assert_array_equal(ax.images[0].get_array(), table)


def test_bad_input_says_what_is_wanted():
    with pytest.raises(ValueError, match=r"weights must be \(L, S\).*attention_grid"):
        plot.attention_heatmap(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="query_tokens has 2 tokens but the weights have 3 rows"):
        plot.attention_heatmap(np.ones((3, 3)), query_tokens=["a", "b"])
    with pytest.raises(ValueError, match=r"\(layers, heads, L, S\)"):
        plot.attention_grid(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"\(positions, dim\)"):
        plot.positional_encoding_heatmap(np.ones(4))


def test_importing_attnkit_does_not_import_matplotlib():
    code = "import sys, attnkit, attnkit.nn, attnkit.models; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_softmax_saturation_measures_what_it_draws():
    table = plot.saturation_table(dims=(4, 64, 1024), keys=8, queries=200)
    unscaled, scaled = table["unscaled"], table["scaled"]
    assert np.all(np.diff(unscaled["entropy"]) < 0) and np.all(np.diff(unscaled["gradient"]) < 0)
    assert np.all(np.diff(unscaled["top_weight"]) > 0) and unscaled["top_weight"][-1] > 0.9
    assert np.ptp(scaled["entropy"]) < 0.2 and scaled["entropy"].min() > 1.5     # near ln 8 = 2.08
    fig = plot.softmax_saturation(dims=(4, 64, 1024))
    assert len(fig.axes) == 3
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(),
                               plot.saturation_table(dims=(4, 64, 1024))["unscaled"]["entropy"])


def test_cost_vs_length_times_both_and_draws_the_memory_bound():
    fig = plot.cost_vs_length(lengths=(64, 128), heads=2, head_dim=16, naive_limit=64, repeat=1)
    times = fig.attnkit_times
    assert times["lengths"] == [64, 128] and len(times["fused"]) == 2 and len(times["naive"]) == 1
    assert all(t > 0 for t in times["fused"] + times["naive"])
    naive_memory = fig.axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(naive_memory, 2 * 2 * np.array([64.0, 128.0]) ** 2 * 4 / 2**20)


def test_training_curves_take_values_or_step_value_pairs():
    ax = plot.training_curves({"a": [3.0, 2.0, 1.5, 1.0, 0.8, 0.7], "b": [(2, 0.5), (4, 0.9)]},
                              smooth=3, ylabel="loss", log_y=True)
    raw, mean, b = ax.lines
    np.testing.assert_array_equal(raw.get_xdata(), [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(mean.get_ydata(), [13 / 6, 1.5, 1.1, 2.5 / 3])   # running mean of 3
    np.testing.assert_array_equal(b.get_xdata(), [2, 4])
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="no curves"):
        plot.training_curves({})


def test_layer_vs_batch_norm_shows_which_depends_on_the_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3)) * 2 + 5
    pad = np.array([[False] * 4, [False, False, True, True]])
    x[pad] = 0.0
    fig, values = plot.layer_vs_batch_norm(x, pad, partner=rng.standard_normal((1, 4, 3)) * 2 + 5)
    np.testing.assert_allclose(values["layer norm, in the batch"], values["layer norm, alone"], rtol=1e-12)
    for a, b in (("batch norm, padding counted", "batch norm, padding masked"),
                 ("batch norm, padding masked", "batch norm, another partner")):
        assert not np.allclose(values[a], values[b])
    assert len(fig.axes[0].patches) == 5 * 3
    with pytest.raises(ValueError, match=r"\(N, L, C\)"):
        plot.layer_vs_batch_norm(x[0], pad)
