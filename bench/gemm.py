"""attnkit's GEMM (F.linear: x @ W.T + bias) against NumPy's BLAS and PyTorch.

    python bench/gemm.py --threads 1
    python bench/gemm.py --threads 2 --rounds 7
    python bench/gemm.py --backward --rows 128 4096     dx, dW and db of the same layers

The shapes are the issue's: M rows in {1, 16, 128, 4096} against the
(in_features K, out_features N) of MiniLM's and BERT-base's layers. Each
measurement runs in a fresh process of its own, NumPy imported first as
users do, the contenders taking turns round after round, each held to the
same number of threads through its own setting: attnkit.set_num_threads,
OPENBLAS_NUM_THREADS for NumPy, torch.set_num_threads. Every contender
computes the same float32 product with the bias added (with --backward: dx
= dy @ W, dW = dy.T @ x and db = dy.sum(0), what linear's backward runs);
the table gives the median over rounds of each process's median time per
call, and the median over rounds of the ratios (above 1: attnkit is
faster).
"""
import argparse
import statistics

from worker import run_worker

ROWS = [1, 16, 128, 4096]
SHAPES = [(384, 1152), (384, 1536), (1536, 384), (768, 3072)]       # (K, N)

WORKER = r"""
import json, statistics, sys, timeit
import numpy as np
contender, threads, M, K, N = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
rng = np.random.default_rng(0)
x = rng.standard_normal((M, K)).astype(np.float32)
w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
b = rng.standard_normal(N).astype(np.float32)
backward = sys.argv[6] == "1"
dy = rng.standard_normal((M, N)).astype(np.float32)
if contender == "attnkit":
    import attnkit
    attnkit.set_num_threads(threads)
    if backward:
        call = lambda: attnkit.functional.linear_backward(dy, x, w)
    else:
        call = lambda: attnkit.functional.linear(x, w, b)
elif contender == "numpy":
    if backward:
        call = lambda: (dy @ w, dy.T @ x, dy.sum(axis=0))
    else:
        call = lambda: np.add(x @ w.T, b)
else:
    import torch
    torch.set_num_threads(threads)
    tx, tw, tb, tdy = map(torch.from_numpy, (x, w, b, dy))
    if backward:          # the products autograd runs for linear's backward
        def call():
            with torch.no_grad():
                return tdy @ tw, tdy.t() @ tx, tdy.sum(0)
    else:
        def call():
            with torch.inference_mode():
                return torch.nn.functional.linear(tx, tw, tb)
call()
n = max(1, int(0.05 / max(timeit.timeit(call, number=1), 1e-6)))
print(json.dumps(statistics.median(timeit.repeat(call, number=n, repeat=7)) / n))
"""


def measure(contender, threads, M, K, N, backward=False):
    return run_worker(WORKER, threads, contender, threads, M, K, N, int(backward))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and case")
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--backward", action="store_true",
                        help="time dx = dy @ W, dW = dy.T @ x and db = dy.sum(0) instead of the forward")
    args = parser.parse_args(argv)
    contenders = ["attnkit", "numpy"]
    try:
        import torch  # noqa: F401
        contenders.append("torch")
    except ImportError:
        pass
    import attnkit
    print(f"attnkit {attnkit.__version__}, SIMD path {attnkit.simd_path()}, {args.threads} thread(s), "
          f"{args.rounds} rounds, float32, {'backward' if args.backward else 'forward'}; times in us, "
          f"ratios = contender / attnkit")
    header = f"{'M':>5} {'K':>5} {'N':>5} " + " ".join(f"{c:>10}" for c in contenders)
    header += "".join(f" {c + '/attnkit':>15}" for c in contenders[1:])
    print(header)
    for M in args.rows:
        for K, N in SHAPES:
            times = {c: [] for c in contenders}
            ratios = {c: [] for c in contenders[1:]}
            for _ in range(args.rounds):
                this = {c: measure(c, args.threads, M, K, N, args.backward) for c in contenders}
                for c in contenders:
                    times[c].append(this[c])
                for c in contenders[1:]:
                    ratios[c].append(this[c] / this["attnkit"])
            line = f"{M:5d} {K:5d} {N:5d} " + " ".join(f"{statistics.median(times[c]) * 1e6:10.1f}"
                                                     for c in contenders)
            line += "".join(f" {statistics.median(ratios[c]):15.2f}" for c in contenders[1:])
            print(line, flush=True)


if __name__ == "__main__":
    main()
