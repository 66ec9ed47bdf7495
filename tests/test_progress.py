"""attnkit.progress: tqdm's bar when tqdm is there, a plain line otherwise,
and nothing at all unless asked."""
import io
import subprocess
import sys

import pytest

from attnkit.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_line_in_a_log_writes_a_line_per_tenth():
    stream = io.StringIO()
    with progress_bar(50, desc="train", unit="step", file=stream, use_tqdm=False) as bar:
        for step in range(50):
            bar.set_postfix(loss=1.0 / (step + 1))
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" [")[0] for line in lines] == [
        f"train: {5 * k}/50 step ({10 * k}%)" for k in range(1, 11)]
    assert lines[-1].endswith("loss=0.02]")                   # the postfix set before the update


def test_plain_line_on_a_terminal_is_rewritten_in_place():
    stream = _Terminal()
    with progress_bar(3, desc="encode", unit="batch", file=stream, use_tqdm=False) as bar:
        for _ in range(3):
            bar.update()
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "encode: 3/3 batch (100%)" in text.splitlines()[-1].split("\r")[-1]


def test_write_prints_to_stdout_and_keeps_the_bar(capsys):
    stream = _Terminal()
    with progress_bar(2, file=stream, use_tqdm=False) as bar:
        bar.update()
        bar.write("  step 1  loss 0.5")
        bar.update()
    assert capsys.readouterr().out == "  step 1  loss 0.5\n"
    assert stream.getvalue().rstrip("\n").endswith("]")        # the bar was drawn again


def test_an_interrupted_bar_says_where_it_stopped():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with progress_bar(100, desc="d", file=stream, use_tqdm=False) as bar:
            for step in range(100):
                if step == 37:
                    raise KeyboardInterrupt
                bar.update()
    assert stream.getvalue().splitlines()[-1].startswith("d: 37/100 it (37%)")


def test_disabled_shows_nothing_but_write_still_prints(capsys):
    stream = io.StringIO()
    with progress_bar(5, file=stream, enabled=False) as bar:
        bar.update(5)
        bar.set_postfix(loss=0.1)
        bar.write("line")
    assert stream.getvalue() == "" and capsys.readouterr().out == "line\n"


def test_tqdm_is_used_when_installed():
    pytest.importorskip("tqdm")                 # installed with transformers, as in CI
    stream = io.StringIO()
    with progress_bar(4, desc="tq", unit="batch", file=stream) as bar:
        bar.update(4)
    assert "tq: 100%" in stream.getvalue() and "4/4" in stream.getvalue()


@pytest.mark.parametrize("total", [-1, 2.5, True, None])
def test_total_must_be_a_count(total):
    with pytest.raises(ValueError, match="total must be a non-negative int"):
        progress_bar(total)


def test_importing_attnkit_does_not_import_tqdm():
    code = ("import sys, attnkit, attnkit.nn, attnkit.models, attnkit.progress; "
            "print('tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
