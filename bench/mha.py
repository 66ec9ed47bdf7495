"""MultiHeadAttention and the transformer layers, forward in eval mode:
attnkit.nn against torch.nn.

    python bench/mha.py --threads 1
    python bench/mha.py --threads 2 --rounds 7

Each measurement runs in a fresh process of its own, NumPy imported first as
users do, one contender at a time, the contenders taking turns round after
round: two OpenMP runtimes in one process (attnkit's and PyTorch's) keep
their idle threads spinning against each other and slow both by up to 5x,
which would measure the neighbour, not the library. Each process pins its
threads (attnkit.set_num_threads, torch.set_num_threads, and
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS). Both contenders run layers of the
same shapes from the same float32 input, batch_first; the weights are each
library's own initialisation (they do not change the time). The
table gives the median over rounds of each process's median time per call,
and the ratio attnkit / torch (below 1: attnkit is faster).
"""
import argparse
import statistics
import sys

from worker import run_worker

GROUPS = [("mha", 1, 128, 384, 12), ("mha", 8, 128, 768, 12), ("mha", 1, 1024, 512, 8),   # (layer, B, L, E, H)
          ("encoder", 8, 128, 768, 12), ("decoder", 8, 128, 768, 12)]

WORKER = r"""
import json, os, statistics, sys, timeit
import numpy as np                        # first, as users do
contender, threads, layer, B, L, E, H, need = (sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:8]),
                                               sys.argv[8] == "1")
rng = np.random.default_rng(0)
x = rng.standard_normal((B, L, E)).astype(np.float32)
memory = rng.standard_normal((B, L, E)).astype(np.float32)
if contender == "attnkit":
    import attnkit
    from attnkit import nn
    attnkit.set_num_threads(threads)
    if layer == "mha":
        m = nn.MultiHeadAttention(E, H, batch_first=True, rng=rng).eval()
        call = lambda: m(x, x, x, need_weights=need)
    elif layer == "encoder":
        m = nn.TransformerEncoderLayer(E, H, 4 * E, batch_first=True, rng=rng).eval()
        call = lambda: m(x)
    else:
        m = nn.TransformerDecoderLayer(E, H, 4 * E, batch_first=True, rng=rng).eval()
        call = lambda: m(x, memory)
else:
    import torch
    torch.set_num_threads(threads)
    tx, tmemory = torch.from_numpy(x), torch.from_numpy(memory)
    if layer == "mha":
        m = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        forward = lambda: m(tx, tx, tx, need_weights=need)
    elif layer == "encoder":
        m = torch.nn.TransformerEncoderLayer(E, H, 4 * E, batch_first=True).eval()
        forward = lambda: m(tx)
    else:
        m = torch.nn.TransformerDecoderLayer(E, H, 4 * E, batch_first=True).eval()
        forward = lambda: m(tx, tmemory)
    def call():
        with torch.inference_mode():
            return forward()
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
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench/mha.py compares with PyTorch, which is not installed")
    import numpy
    import attnkit
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch.__version__}; {args.threads} thread(s); median of {args.rounds} rounds")
    print(f"{'case':<44}{'attnkit':>11}{'torch':>11}{'attnkit/torch':>15}")
    for group in GROUPS:
        for need in ((False, True) if group[0] == "mha" else (False,)):
            times = {"attnkit": [], "torch": []}
            ratios = []
            for r in range(args.rounds):
                order = ("attnkit", "torch") if r % 2 == 0 else ("torch", "attnkit")
                this = {contender: measure(contender, args.threads, group, need) for contender in order}
                for contender in order:
                    times[contender].append(this[contender])
                ratios.append(this["attnkit"] / this["torch"])
            a, t = statistics.median(times["attnkit"]), statistics.median(times["torch"])
            layer, B, L, E, H = group
            name = f"{layer} B{B} L{L} E{E} H{H}" + (f" need_weights={need}" if layer == "mha" else "")
            print(f"{name:<44}{a * 1e3:>9.2f}ms{t * 1e3:>9.2f}ms{statistics.median(ratios):>14.2f}", flush=True)


if __name__ == "__main__":
    main()
