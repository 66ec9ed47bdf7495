"""Attention forward + backward (a training step's attention): attnkit against
PyTorch's F.scaled_dot_product_attention forward and .backward().

    python bench/attention_backward.py --threads 1
    python bench/attention_backward.py --threads 2 --rounds 7

attnkit: scaled_dot_product_attention(..., return_lse=True), then
scaled_dot_product_attention_backward with the output and lse. PyTorch:
the forward on tensors that require grad, then out.backward(grad_out), the
gradients set to None between calls as an optimiser's zero_grad does. Same
float inputs and gradient in both.

Each measurement runs in a fresh process of its own, NumPy imported first as
users do, the contenders taking turns round after round and held to the same
threads (each library's own setting plus OMP_NUM_THREADS). The table gives
the median over rounds of each process's median time per step and the median
of the per-round ratios attnkit / torch (below 1: attnkit is faster; the
target is at most 0.8).
"""
import argparse
import statistics
import sys

from worker import run_worker

# name, B, H, L, S, E, causal, dtype: the forward's groups (bench/contenders.py)
GROUPS = [
    ("B1 H12 L128 E64", 1, 12, 128, 128, 64, False, "float32"),
    ("B8 H12 L128 E64", 8, 12, 128, 128, 64, False, "float32"),
    ("B1 H8 L1024 E64", 1, 8, 1024, 1024, 64, False, "float32"),
    ("causal B1 H8 L1024 E64", 1, 8, 1024, 1024, 64, True, "float32"),
    ("causal B1 H8 L4096 E64", 1, 8, 4096, 4096, 64, True, "float32"),
    ("float64 B1 H8 L1024 E64", 1, 8, 1024, 1024, 64, False, "float64"),
]


def make_step(contender, B, H, L, S, E, causal, dtype, threads=None):
    """A callable of no arguments: one forward and backward of attention."""
    import numpy as np
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, E)).astype(dtype)
    k, v = (rng.standard_normal((B, H, S, E)).astype(dtype) for _ in range(2))
    grad_out = rng.standard_normal((B, H, L, E)).astype(dtype)
    if contender == "attnkit":
        import attnkit
        if threads:
            attnkit.set_num_threads(threads)

        def step():
            out, lse = attnkit.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
            return attnkit.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse,
                                                                 is_causal=causal)
        return step
    import torch
    if threads:
        torch.set_num_threads(threads)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tg = torch.from_numpy(grad_out)

    def step():
        for t in (tq, tk, tv):
            t.grad = None
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).backward(tg)
        return tq.grad, tk.grad, tv.grad
    return step


WORKER = r"""
import json, statistics, sys, timeit
import numpy as np                        # first, as users do
sys.path.insert(0, sys.argv[1])
from attention_backward import make_step
contender, threads = sys.argv[2], int(sys.argv[3])
B, H, L, S, E = map(int, sys.argv[4:9])
step = make_step(contender, B, H, L, S, E, sys.argv[9] == "1", sys.argv[10], threads)
step()
n = max(1, int(0.2 / max(timeit.timeit(step, number=1), 1e-6)))
print(json.dumps(statistics.median(timeit.repeat(step, number=n, repeat=5)) / n))
"""


def main(argv=None):
    import os
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and group")
    parser.add_argument("--groups", nargs="*", help="only the groups whose names contain these words")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench/attention_backward.py compares with PyTorch, which is not installed")
    import numpy
    import attnkit
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch.__version__}; {args.threads} thread(s); median of {args.rounds} rounds")
    print(f"{'forward + backward':<28}{'attnkit':>11}{'torch':>11}{'attnkit/torch':>15}")
    for name, B, H, L, S, E, causal, dtype in GROUPS:
        if args.groups and not any(word in name for word in args.groups):
            continue
        times = {"attnkit": [], "torch": []}
        ratios = []
        for r in range(args.rounds):
            order = ("attnkit", "torch") if r % 2 == 0 else ("torch", "attnkit")
            this = {c: run_worker(WORKER, args.threads, here, c, args.threads, B, H, L, S, E,
                                  int(causal), dtype) for c in order}
            for c in order:
                times[c].append(this[c])
            ratios.append(this["attnkit"] / this["torch"])
        a, t = statistics.median(times["attnkit"]), statistics.median(times["torch"])
        print(f"{name:<28}{a * 1e3:>9.2f}ms{t * 1e3:>9.2f}ms{statistics.median(ratios):>14.2f}", flush=True)


if __name__ == "__main__":
    main()
