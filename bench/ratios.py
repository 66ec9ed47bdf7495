"""Median times of attnkit, NumPy and torch side by side, and their ratios.

    python bench/ratios.py --threads 1                   softmax and layer_norm
    python bench/ratios.py --threads 2 --repeats 31
    python bench/ratios.py --attention --threads 1       issue 3's attention groups

Runs the cases of bench/contenders.py (softmax and layer_norm, float32, last
axis; or, with --attention, scaled_dot_product_attention) with timeit. Each contender is timed in `--repeats` samples, a sample
being a batch of calls that lasts at least `--min-time` seconds; the
contenders take turns sample by sample, in a rotating order, so that drift on
a shared machine hits all of them alike. The table gives each contender's
median time per call and the ratios numpy/attnkit and torch/attnkit (above 1:
attnkit is faster). Quote the ratios of one run; absolute times drift.
"""
import argparse
import math
import os
import statistics
import timeit

import contenders

NOISY = 0.25  # a median is marked * when the IQR of its samples exceeds this fraction of it


def calls_per_sample(function, min_time):
    """How many calls make one timed batch last at least min_time seconds
    (running them also warms the function up)."""
    timer = timeit.Timer(function)
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= min_time:
            return number
        wanted = math.ceil(number * 1.2 * min_time / max(elapsed, 1e-9))
        number = min(10 * number, max(number + 1, wanted))


def interleaved_samples(functions, repeats, min_time):
    """{name: [seconds per call, one per sample]}, the functions timed in turns."""
    names = list(functions)
    timers = {name: timeit.Timer(functions[name]) for name in names}
    numbers = {name: calls_per_sample(functions[name], min_time) for name in names}
    samples = {name: [] for name in names}
    for r in range(repeats):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            samples[name].append(timers[name].timeit(numbers[name]) / numbers[name])
    return samples


def is_noisy(samples):
    """Whether the samples' interquartile range exceeds NOISY x their median."""
    if len(samples) < 4:
        return False
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return q3 - q1 > NOISY * median


def format_time(seconds):
    """Three significant digits in s, ms, us or ns: '2.05 ms', '692 ns'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            decimals = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{decimals}f} {unit}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for attnkit and torch (default 1)")
    parser.add_argument("--repeats", type=int, default=21,
                        help="timed samples per contender and case (default 21)")
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="seconds one sample lasts at least (default 0.02)")
    parser.add_argument("--attention", action="store_true",
                        help="time the attention groups instead of softmax and layer_norm")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.min_time <= 0:
        parser.error("--threads and --repeats must be at least 1, --min-time above 0")
    if args.attention:
        return attention_table(args)

    contenders.pin_threads(args.threads)
    names = [c for c in contenders.CONTENDERS if contenders.available(c)]
    others = [c for c in names if c != "attnkit"]
    print(f"{contenders.versions()}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the start")
    print(f"{args.threads} thread(s); float32, last axis; median time per call of "
          f"{args.repeats} interleaved samples of >= {args.min_time:g} s each")
    print("ratio = contender's median / attnkit's median (above 1: attnkit is faster)")
    print()
    header = f"{'case':<22}" + "".join(f"{name:>11}" for name in names)
    header += "".join(f"{name + '/attnkit':>16}" for name in others)
    print(header)
    print("-" * len(header))

    ratios = {name: [] for name in others}  # over the large cases, for the geometric mean
    for op, shapes in contenders.SHAPES.items():
        for shape in shapes:
            case = contenders.Case(op, shape)
            functions = {name: case.function(name) for name in names}
            samples = interleaved_samples(functions, args.repeats, args.min_time)
            medians = {name: statistics.median(samples[name]) for name in names}
            line = f"{case.name:<22}"
            for name in names:
                mark = "*" if is_noisy(samples[name]) else " "
                line += f"{format_time(medians[name]):>10}{mark}"
            for name in others:
                ratio = medians[name] / medians["attnkit"]
                line += f"{ratio:>15.2f}x"
                if shape != contenders.SMALL_SHAPE:
                    ratios[name].append(ratio)
            print(line, flush=True)
    print("-" * len(header))
    line = f"{'geomean (large cases)':<22}" + " " * 11 * len(names)
    line += "".join(f"{statistics.geometric_mean(ratios[n]):>15.2f}x" for n in others)
    print(line)
    print(f"* the samples' interquartile range exceeds {NOISY:.0%} of the median: noisy")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


# The NumPy contender materialises the (L, S) scores, several copies of them;
# past this many scores per call it takes too long to sample.
NUMPY_MAX_SCORES = 40_000_000


def attention_table(args):
    """Issue 3's attention groups: medians, ratios, attnkit's GFLOP/s, and
    NumPy's one-thread float32 matmul rate for scale."""
    contenders.pin_threads(args.threads)
    names = [c for c in contenders.CONTENDERS if contenders.available(c)]
    others = [c for c in names if c != "attnkit"]
    matmul_before = contenders.numpy_matmul_rate()
    print(contenders.versions())
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the start")
    print(f"{args.threads} thread(s); median time per call of {args.repeats} interleaved samples "
          f"of >= {args.min_time:g} s each; numpy = the reference, materialised, in the group's dtype")
    print(f"NumPy float32 matmul 2048x2048 on one thread: {matmul_before:.1f} GFLOP/s")
    print()
    header = f"{'group':<34}" + "".join(f"{name:>11}" for name in names)
    header += "".join(f"{name + '/attnkit':>16}" for name in others) + f"{'attnkit GFLOP/s':>17}"
    print(header)
    print("-" * len(header))
    for group in contenders.ATTENTION_GROUPS:
        case = contenders.AttentionCase(*group)
        B, H, L, S, E = case.dims
        runnable = [n for n in names if n != "numpy" or B * H * L * S <= NUMPY_MAX_SCORES]
        functions = {name: case.function(name) for name in runnable}
        samples = interleaved_samples(functions, args.repeats, args.min_time)
        medians = {name: statistics.median(samples[name]) for name in runnable}
        line = f"{case.name:<34}"
        for name in names:
            if name in medians:
                mark = "*" if is_noisy(samples[name]) else " "
                line += f"{format_time(medians[name]):>10}{mark}"
            else:
                line += f"{'-':>10} "
        for name in others:
            line += (f"{medians[name] / medians['attnkit']:>15.2f}x" if name in medians
                     else f"{'-':>16}")
        line += f"{case.flops / medians['attnkit'] / 1e9:>17.1f}"
        print(line, flush=True)
    print("-" * len(header))
    matmul_after = contenders.numpy_matmul_rate()
    print(f"NumPy float32 matmul 2048x2048 on one thread, again: {matmul_after:.1f} GFLOP/s")
    print(f"* the samples' interquartile range exceeds {NOISY:.0%} of the median: noisy")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
