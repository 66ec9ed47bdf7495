"""Which SIMD path the kernels run on, how many threads they use, and the build.

At import the best path this CPU supports is chosen. The environment variable
ATTNKIT_CPU=scalar|avx2|avx512 asks for a lower one (for comparison, or to
rule out a path); asking for a path the CPU lacks falls back, with a warning,
to the best one it has below that.
"""
from __future__ import annotations

import contextlib
import operator
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal, overload

from . import _kernels

SIMD_PATHS = tuple(_kernels.isa_names())  # lowest first: scalar, avx2, avx512


def _best_supported(up_to: int = len(SIMD_PATHS) - 1) -> int:
    return max(i for i in range(up_to + 1) if _kernels.isa_supported(i))


def _choose_at_import() -> str | None:
    requested = os.environ.get("ATTNKIT_CPU", "").strip().lower()
    if not requested:
        return None
    if requested not in SIMD_PATHS:
        warnings.warn(
            f"ATTNKIT_CPU={requested!r} is not one of {', '.join(SIMD_PATHS)}; "
            f"using {SIMD_PATHS[_kernels.get_isa()]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    index = SIMD_PATHS.index(requested)
    chosen = _best_supported(index)
    if chosen != index:
        warnings.warn(
            f"ATTNKIT_CPU={requested!r}: this CPU does not support {requested}; "
            f"using {SIMD_PATHS[chosen]}",
            RuntimeWarning,
            stacklevel=3,
        )
    _kernels.set_isa(chosen)
    return requested


_REQUESTED = _choose_at_import()


def simd_path() -> str:
    """The SIMD path the kernels run on now: 'scalar', 'avx2' or 'avx512'."""
    return SIMD_PATHS[_kernels.get_isa()]


def supported_simd_paths() -> list[str]:
    """The SIMD paths this CPU can run, lowest first."""
    return [name for i, name in enumerate(SIMD_PATHS) if _kernels.isa_supported(i)]


@contextlib.contextmanager
def use_simd_path(name: str) -> Iterator[str]:
    """Run the kernels on SIMD path `name` inside a with-block (for tests and
    comparisons; not thread-safe: it switches the path for the whole process)."""
    if name not in SIMD_PATHS:
        raise ValueError(f"unknown SIMD path {name!r}; expected one of {', '.join(SIMD_PATHS)}")
    index = SIMD_PATHS.index(name)
    if not _kernels.isa_supported(index):
        raise ValueError(f"this CPU cannot run the {name} path; it supports "
                         f"{', '.join(supported_simd_paths())}")
    before = _kernels.get_isa()
    _kernels.set_isa(index)
    try:
        yield name
    finally:
        _kernels.set_isa(before)


def set_num_threads(n: int) -> None:
    """Set how many threads attnkit's kernels may use (at least 1).

    The default is OpenMP's, which honours OMP_NUM_THREADS. Small calls use
    one thread whatever this says, and results do not depend on it: every row
    is computed the same way on any number of threads.
    """
    if isinstance(n, bool):
        raise TypeError("set_num_threads: expected an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: expected an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, got {n}")
    _kernels.set_num_threads(n)


def get_num_threads() -> int:
    """How many threads attnkit's kernels may use."""
    return _kernels.get_num_threads()


@overload
def show_config(mode: Literal["stdout"] = "stdout") -> None: ...
@overload
def show_config(mode: Literal["dicts"]) -> dict[str, Any]: ...
def show_config(mode: Literal["stdout", "dicts"] = "stdout") -> dict[str, Any] | None:
    """Print (mode='stdout') or return (mode='dicts') how attnkit was built and runs.

    Reports the SIMD path in use, the paths built and the ones this CPU runs,
    the thread count, the compiler and its flags.
    """
    from . import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "simd": {
            "path": simd_path(),
            "requested_by_ATTNKIT_CPU": _REQUESTED,
            "built": list(SIMD_PATHS),
            "supported_by_cpu": supported_simd_paths(),
        },
        "threads": {
            "num_threads": get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "single_threaded_after_fork": _kernels.in_forked_child(),
        },
        "build": _kernels.build_info(),
    }
    if mode == "dicts":
        return info
    if mode != "stdout":
        raise ValueError(f"show_config: mode must be 'stdout' or 'dicts', got {mode!r}")
    simd, threads, build = info["simd"], info["threads"], info["build"]
    lines = [
        f"attnkit {info['version']}",
        f"  SIMD path in use:     {simd['path']}"
        + (f"  (ATTNKIT_CPU={simd['requested_by_ATTNKIT_CPU']})" if _REQUESTED else ""),
        f"  SIMD paths built:     {', '.join(simd['built'])}",
        f"  this CPU supports:    {', '.join(simd['supported_by_cpu'])}",
        f"  threads:              {threads['num_threads']} (OpenMP; OMP_NUM_THREADS="
        f"{threads['OMP_NUM_THREADS'] or 'unset'})",
        f"  compiler:             {build['compiler']}",
        f"  flags:                {build['flags']}",
    ]
    lines += [f"  {name + ' flags:':<22}{flags or '(baseline x86-64)'}"
              for name, flags in build["isa_flags"].items()]
    if build["sanitized"]:
        lines.append("  built with:           -fsanitize=address,undefined")
    if build["avx512_emulated"]:
        lines.append("  test build:           the avx512 path runs on SIMDe's emulation (not for speed)")
    if threads["single_threaded_after_fork"]:
        lines.append("  forked child:         kernels run single-threaded (OpenMP is not fork-safe)")
    print("\n".join(lines))
    return None

