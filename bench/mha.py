"""MultiHeadAttention forward, attnkit against torch.nn.MultiheadAttention.

    python bench/mha.py --threads 1
    python bench/mha.py --threads 2 --rounds 7
    python bench/mha.py --threads 2 --numpy-first

Each measurement runs in a fresh process of its own, one contender at a
time, the contenders taking turns round after round: two OpenMP runtimes in
one process (attnkit's and PyTorch's) keep their idle threads spinning
against each other and slow both by up to 5x, which would measure the
neighbour, not the library. The process pins its threads: attnkit's and
NumPy's BLAS (OPENBLAS_NUM_THREADS) for attnkit, torch.set_num_threads for
PyTorch. The attnkit process imports attnkit before NumPy, as the README
advises (--numpy-first: the other order, where NumPy's OpenBLAS threads
spin after each product against attnkit's attention kernel). Both
contenders get the same weights (a PyTorch state dict loaded
into attnkit) and the same float32 input, batch_first. The table gives the
median over rounds of each process's median time per call, and the ratio
attnkit / torch (below 1: attnkit is faster).
"""
import argparse
import statistics
import sys

from worker import run_worker

GROUPS = [(1, 128, 384, 12), (8, 128, 768, 12), (1, 1024, 512, 8)]  # (B, L, E, H)

WORKER = r"""
import json, os, statistics, sys, timeit
contender, threads, B, L, E, H, need = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7]), sys.argv[7] == "1"
if contender == "attnkit":
    import attnkit    # before NumPy, as the README advises: its BLAS threads then sleep between products
elif contender == "attnkit-numpy-first":
    import numpy
    contender = "attnkit"
import numpy as np
rng = np.random.default_rng(0)
x = rng.standard_normal((B, L, E)).astype(np.float32)
if contender == "attnkit":
    import attnkit
    from attnkit import nn
    attnkit.set_num_threads(threads)
    m = nn.MultiHeadAttention(E, H, batch_first=True, rng=rng).eval()
    call = lambda: m(x, x, x, need_weights=need)
else:
    import torch
    torch.set_num_threads(threads)
    m = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    tx = torch.from_numpy(x)
    def call():
        with torch.inference_mode():
            return m(tx, tx, tx, need_weights=need)
call()
n = max(1, int(0.05 / max(timeit.timeit(call, number=1), 1e-6)))
print(json.dumps(statistics.median(timeit.repeat(call, number=n, repeat=7)) / n))
"""


def measure(contender, threads, group, need):
    return run_worker(WORKER, threads, contender, threads, *group, "1" if need else "0")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and case")
    parser.add_argument("--numpy-first", action="store_true",
                        help="attnkit's process imports NumPy before attnkit (OpenBLAS threads spin)")
    args = parser.parse_args(argv)
    worker = {"attnkit": "attnkit-numpy-first" if args.numpy_first else "attnkit", "torch": "torch"}
    try:
        import torch
    except ImportError:
        sys.exit("bench/mha.py compares with PyTorch, which is not installed")
    import numpy
    import attnkit
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch.__version__}; {args.threads} thread(s); median of {args.rounds} rounds"
          + ("; NumPy imported before attnkit" if args.numpy_first else ""))
    print(f"{'case':<34}{'attnkit':>11}{'torch':>11}{'attnkit/torch':>15}")
    for group in GROUPS:
        for need in (False, True):
            times = {"attnkit": [], "torch": []}
            for r in range(args.rounds):
                order = ("attnkit", "torch") if r % 2 == 0 else ("torch", "attnkit")
                for contender in order:
                    times[contender].append(measure(worker[contender], args.threads, group, need))
            a, t = statistics.median(times["attnkit"]), statistics.median(times["torch"])
            B, L, E, H = group
            name = f"B{B} L{L} E{E} H{H} need_weights={need}"
            print(f"{name:<34}{a * 1e3:>9.2f}ms{t * 1e3:>9.2f}ms{a / t:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
