"""Progress on long work: tqdm's bar when tqdm is installed, one plain line
otherwise.

attnkit's library calls print nothing unless asked
(`SentenceEncoder.encode(..., show_progress_bar=True)`); the lessons in
examples/ ask. tqdm is optional (`pip install "attnkit[progress]"`); without
it, a terminal gets one line rewritten in place and a file or pipe gets a
line every tenth of the way, so that a log does not fill with carriage
returns.

>>> import io
>>> from attnkit.progress import progress_bar
>>> stream = io.StringIO()
>>> with progress_bar(4, desc="batches", unit="batch", file=stream, use_tqdm=False) as bar:
...     for _ in range(4):
...         bar.update()
>>> stream.getvalue().splitlines()[-1].split(" [")[0]
'batches: 4/4 batch (100%)'
"""
from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

__all__ = ["progress_bar"]


def progress_bar(total: int, *, desc: str | None = None, unit: str = "it", enabled: bool = True,
                 file: IO[str] | None = None, use_tqdm: bool | None = None) -> _Silent:
    """A progress bar over `total` units of work, used as a context manager:
    `bar.update(n=1)` after each unit, `bar.set_postfix(loss=0.25)` for the
    figures beside it, `bar.write(line)` to print a line without breaking
    the bar (to stdout, as print's). enabled=False gives a bar that shows
    nothing (its write still prints). The bar goes to
    `file` (default: sys.stderr). use_tqdm: None takes tqdm if it can be
    imported; False always takes the plain line."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"progress_bar: total must be a non-negative int, got {total!r}")
    if not enabled:
        return _Silent()
    if use_tqdm is not False:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if use_tqdm:
                raise ImportError("progress_bar(use_tqdm=True) needs tqdm: "
                                  'pip install "attnkit[progress]"') from None
        else:
            return _Tqdm(tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True))
    return _PlainLine(total, desc, unit, sys.stderr if file is None else file)


class _Silent:
    """What progress_bar returns (this one shows nothing)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **figures: Any) -> None:
        pass

    def write(self, line: str) -> None:
        print(line)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tqdm(_Silent):
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **figures: Any) -> None:
        self._bar.set_postfix(figures, refresh=False)

    def write(self, line: str) -> None:
        self._bar.write(line)

    def close(self) -> None:
        self._bar.close()


class _PlainLine(_Silent):
    """`desc: done/total unit (percent) [elapsed, rate, postfix]`, rewritten in
    place on a terminal at most ten times a second, or written as a new line
    at each tenth of the way (and at the end) anywhere else."""

    def __init__(self, total: int, desc: str | None, unit: str, stream: IO[str]) -> None:
        self._total, self._unit, self._stream = total, unit, stream
        self._prefix = f"{desc}: " if desc else ""
        self._done, self._postfix = 0, ""
        self._start = self._last = time.perf_counter()
        self._tenth = 0
        isatty = getattr(stream, "isatty", None)
        self._terminal = bool(isatty and isatty())
        self._width = 0
        self._closed = False

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self._done // self._total}%)" if self._total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        return (f"{self._prefix}{self._done}/{self._total} {self._unit}{share} "
                f"[{elapsed:.1f} s, {rate:.3g} {self._unit}/s{extra}]")

    def _show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._terminal:
            if force or now - self._last >= 0.1:
                line = self._line()
                self._stream.write("\r" + line.ljust(self._width))
                self._stream.flush()
                self._width, self._last = len(line), now
            return
        tenth = 10 * self._done // self._total if self._total else 10
        if force or tenth > self._tenth:
            self._tenth = tenth
            self._stream.write(self._line() + "\n")
            self._stream.flush()

    def update(self, n: int = 1) -> None:
        self._done += n
        self._show(force=self._done >= self._total)

    def set_postfix(self, **figures: Any) -> None:
        self._postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in figures.items())

    def write(self, line: str) -> None:
        """The line goes to stdout, as print's would; on a terminal the bar
        is cleared first and drawn again below it."""
        if self._terminal and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
        print(line, flush=True)
        if self._terminal and self._width:
            self._stream.write(self._line())
            self._stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._terminal:
            self._show(force=True)
            self._stream.write("\n")
            self._stream.flush()
        elif self._done < self._total:               # stopped early: say where
            self._show(force=True)
