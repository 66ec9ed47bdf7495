"""The lessons in examples/ run, in their short (--quick) versions, and show
what they set out to show."""
import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
