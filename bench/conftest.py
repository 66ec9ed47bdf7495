"""pytest-benchmark setup for bench/.

    python -m pytest bench/ --benchmark-only                 # 1 thread
    python -m pytest bench/ --benchmark-only --threads 2     # or ATTNKIT_BENCH_THREADS=2

The normal test run (`pytest`, testpaths = tests) does not collect bench/.
Each benchmark is one contender on one case; its group is the case
("softmax 4096x1024"), so the contenders sit side by side in the tables.
Its extra_info (in --benchmark-json or --benchmark-autosave output) holds
the contender, shape, thread count, SIMD path, bytes moved, GB/s and the
error against the float64 reference; a summary of the last two is printed
at the end of the run.
"""
import os
import sys
from pathlib import Path

import pytest

# pyproject's pythonpath covers tests/ only and --import-mode=importlib adds
# nothing to sys.path, so make bench/contenders.py importable for the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnkit  # noqa: E402
import contenders  # noqa: E402

_RESULTS = []  # one dict per benchmark run, for the summary


def pytest_addoption(parser):
    group = parser.getgroup("attnkit benchmarks")
    group.addoption(
        "--threads",
        type=int,
        default=int(os.environ.get("ATTNKIT_BENCH_THREADS", "1")),
        help="threads for attnkit and torch (default: $ATTNKIT_BENCH_THREADS or 1)",
    )


@pytest.fixture(scope="session", autouse=True)
def threads(request):
    """The thread count, set for attnkit and torch before any benchmark runs."""
    n = request.config.getoption("--threads")
    if n < 1:
        raise pytest.UsageError(f"--threads must be at least 1, got {n}")
    contenders.pin_threads(n)
    return n


@pytest.fixture
def run_case(benchmark, threads):
    """run_case(op, shape, contender): benchmark one contender on one case and
    record what it moved, how fast, and how accurately."""

    def run(op, shape, contender):
        if not contenders.available(contender):
            pytest.skip(f"{contender} is not installed")
        if op == "attention":  # shape is the group's name
            case = contenders.get_attention_case(shape)
        else:
            case = contenders.get_case(op, tuple(shape))
        function = case.function(contender)
        benchmark.group = case.name
        info = benchmark.extra_info
        info.update(contender=contender, operation=op, shape=list(case.shape),
                    dtype=str(getattr(case, "dtype", "float32")), threads=threads,
                    simd_path=attnkit.simd_path(), bytes=case.bytes_moved)
        if hasattr(case, "flops"):
            info["flops"] = case.flops
        result = benchmark(function)
        info.update(case.check(result))
        if benchmark.stats:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            info["median_s"] = median
            info["GB/s"] = case.bytes_moved / median / 1e9
            if hasattr(case, "flops"):
                info["GFLOP/s"] = case.flops / median / 1e9
        _RESULTS.append(dict(info, group=case.name))

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs (--benchmark-autosave, --benchmark-json) say what ran where."""
    machine_info["attnkit"] = attnkit.show_config("dicts")
    machine_info["attnkit"]["threads"]["bench_threads"] = config.getoption("--threads")
    machine_info["numpy"] = contenders.np.__version__
    machine_info["torch"] = contenders.torch.__version__ if contenders.torch else None


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("attnkit: GB/s and max abs error vs the float64 reference")
    write(f"{contenders.versions()}; {config.getoption('--threads')} thread(s); "
          "GB/s = (bytes read + written) / median time")
    write(f"{'group':<34}{'contender':<10}{'median':>12}{'GB/s':>9}{'GFLOP/s':>9}"
          f"{'max abs err':>13}  within rule")
    for r in sorted(_RESULTS, key=lambda r: (r["group"], contenders.CONTENDERS.index(r["contender"]))):
        median = f"{r['median_s'] * 1e6:10.1f}us" if "median_s" in r else "-"
        gbps = f"{r['GB/s']:9.2f}" if "GB/s" in r else f"{'-':>9}"
        gflops = f"{r['GFLOP/s']:9.1f}" if "GFLOP/s" in r else f"{'-':>9}"
        write(f"{r['group']:<34}{r['contender']:<10}{median:>12}{gbps}{gflops}"
              f"{r['max_abs_err']:13.2e}  {'yes' if r['within_rule'] else 'NO'}")
