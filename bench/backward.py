"""The backwards of softmax and layer_norm: attnkit against PyTorch's autograd
kernels (and the NumPy reference), float32, over the last axis.

    python bench/backward.py --threads 1
    python bench/backward.py --threads 2 --rounds 7
    python bench/backward.py --ops softmax_backward --shapes 4096x1024

Only the backward is timed, from what the forward saved:
  softmax_backward      attnkit.softmax_backward(grad, y)
                        torch.ops.aten._softmax_backward_data(grad, y, -1, float32)
  log_softmax_backward  attnkit.log_softmax_backward(grad, y)
                        torch.ops.aten._log_softmax_backward_data(grad, y, -1, float32)
  layer_norm_backward   attnkit.layer_norm_backward(grad, x, mean, rstd, C, weight): dx, dweight, dbias
                        torch.ops.aten.native_layer_norm_backward(grad, x, [C], mean, rstd,
                        weight, bias, [True, True, True]), the kernel y.backward() runs
  numpy                 attnkit.reference's backward computed in float32
Each measurement runs in a fresh process of its own, NumPy imported first as
users do, the contenders taking turns round after round, each held to the
same number of threads (attnkit.set_num_threads, torch.set_num_threads, and
OMP_NUM_THREADS/OPENBLAS_NUM_THREADS in the environment); each process
checks that its CPU time did not exceed threads x its wall time. The table
gives the median over rounds of each process's median time per call, and the
median over rounds of the ratios attnkit/torch (below 1: attnkit is faster)
and numpy/attnkit.
"""
import argparse
import os
import statistics

from worker import run_worker

OPS = ["softmax_backward", "log_softmax_backward", "layer_norm_backward"]
SHAPES = [(4096, 1024), (12288, 128), (256, 32768), (8192, 768), (128, 384)]

def make_call(contender, op, rows, cols, threads=None):
    """A callable of no arguments: one backward of `op` on (rows, cols) float32
    by `contender` (attnkit, numpy or torch), from what its forward saved."""
    import numpy as np
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    grad = rng.standard_normal((rows, cols)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    b = (0.1 * rng.standard_normal(cols)).astype(np.float32)
    import attnkit
    from attnkit import reference
    if threads:
        attnkit.set_num_threads(threads)
    if op == "layer_norm_backward":
        _, mean, rstd = attnkit.layer_norm(x, cols, w, b, return_stats=True)
    else:
        y = (attnkit.softmax if op == "softmax_backward" else attnkit.log_softmax)(x)
    if contender == "attnkit":
        if op == "layer_norm_backward":
            return lambda: attnkit.layer_norm_backward(grad, x, mean, rstd, cols, w)
        backward = getattr(attnkit, op)
        return lambda: backward(grad, y)
    if contender == "numpy":
        if op == "layer_norm_backward":
            return lambda: reference.layer_norm_backward(grad, x, mean, rstd, cols, w, dtype=np.float32)
        backward = getattr(reference, op)
        return lambda: backward(grad, y, dtype=np.float32)
    import torch
    if threads:
        torch.set_num_threads(threads)
    tg, tx, tw, tb = map(torch.from_numpy, (grad, x, w, b))
    if op == "layer_norm_backward":
        tm, tr = torch.from_numpy(mean), torch.from_numpy(rstd)
        return lambda: torch.ops.aten.native_layer_norm_backward(tg, tx, [cols], tm, tr, tw, tb,
                                                                 [True, True, True])
    ty = torch.from_numpy(y)
    kernel = (torch.ops.aten._softmax_backward_data if op == "softmax_backward"
              else torch.ops.aten._log_softmax_backward_data)
    return lambda: kernel(tg, ty, -1, torch.float32)


WORKER = r"""
import json, statistics, sys, time, timeit
import numpy as np                        # first, as users do
sys.path.insert(0, sys.argv[1])
from backward import make_call
contender, op, threads, rows, cols = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
call = make_call(contender, op, rows, cols, threads)
call()
n = max(1, int(0.05 / max(timeit.timeit(call, number=1), 1e-6)))
cpu0, wall0 = time.process_time(), time.perf_counter()
t = statistics.median(timeit.repeat(call, number=n, repeat=7)) / n
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
if cpu > threads * wall * 1.1 + 0.01:
    sys.exit(f"{contender} used {cpu / wall:.2f} cores on {threads} thread(s)")
print(json.dumps(t))
"""


def measure(contender, op, threads, rows, cols):
    here = os.path.dirname(os.path.abspath(__file__))
    return run_worker(WORKER, threads, here, contender, op, threads, rows, cols)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and case")
    parser.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    parser.add_argument("--shapes", nargs="*", default=[f"{r}x{c}" for r, c in SHAPES],
                        help="rows x cols, e.g. 4096x1024")
    parser.add_argument("--no-numpy", action="store_true", help="leave the NumPy reference out")
    args = parser.parse_args(argv)
    contenders = ["attnkit", "torch"] + ([] if args.no_numpy else ["numpy"])
    import attnkit
    print(f"attnkit {attnkit.__version__}, SIMD path {attnkit.simd_path()}, {args.threads} thread(s), "
          f"{args.rounds} rounds, float32, last axis; times in us (median over rounds)")
    header = f"{'op':<22}{'shape':>12}" + "".join(f"{c:>10}" for c in contenders)
    header += f"{'attnkit/torch':>15}" + ("" if args.no_numpy else f"{'numpy/attnkit':>15}")
    print(header)
    for op in args.ops:
        for shape in args.shapes:
            rows, cols = map(int, shape.split("x"))
            times = {c: [] for c in contenders}
            vs_torch, vs_numpy = [], []
            for r in range(args.rounds):
                turn = r % len(contenders)
                this = {c: measure(c, op, args.threads, rows, cols)
                        for c in contenders[turn:] + contenders[:turn]}
                for c in contenders:
                    times[c].append(this[c])
                vs_torch.append(this["attnkit"] / this["torch"])
                if not args.no_numpy:
                    vs_numpy.append(this["numpy"] / this["attnkit"])
            line = f"{op:<22}{shape:>12}" + "".join(f"{statistics.median(times[c]) * 1e6:10.1f}"
                                                    for c in contenders)
            line += f"{statistics.median(vs_torch):15.2f}"
            if not args.no_numpy:
                line += f"{statistics.median(vs_numpy):15.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
