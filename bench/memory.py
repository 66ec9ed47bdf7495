"""Peak extra memory of attention at B1 H8 L=S=16384 E64 float32: the forward
(issue 3's target: < 64 MB) and, with --backward, its gradient (issue 11's:
< 128 MB beyond the gradients).

    python bench/memory.py
    python bench/memory.py --backward

The growth of the process's peak resident set over one call, minus the
arrays it returns. A naive computation would hold the 8 GB of scores (and
the backward another 8 GB of their gradient).
"""
import resource
import sys
import time

import numpy as np

import attnkit

B, H, L, E = 1, 8, 16384, 64
backward = "--backward" in sys.argv[1:]
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
small = [a[:, :, :64] for a in (q, k, v)]
out, lse = attnkit.scaled_dot_product_attention(*small, return_lse=True)  # load everything
if backward:
    attnkit.scaled_dot_product_attention_backward(out, *small, out, lse)
    out, lse = attnkit.scaled_dot_product_attention(q, k, v, return_lse=True)
    grad_out = rng.standard_normal(out.shape, dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
if backward:
    results = attnkit.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse)
else:
    results = (attnkit.scaled_dot_product_attention(q, k, v),)
t = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
returned = sum(a.nbytes for a in results)
flops = (10 if backward else 4) * B * H * L * L * E
what = "backward" if backward else "forward"
print(f"{what}, B1 H8 L=S=16384 E64 float32, {attnkit.get_num_threads()} threads: {t:.2f} s, "
      f"{flops / t / 1e9:.1f} GFLOP/s")
print(f"peak RSS grew {(after - before) / 2**20:.1f} MB, of which the results are {returned / 2**20:.1f} MB: "
      f"extra {(after - before - returned) / 2**20:.1f} MB (naive scores: {B * H * L * L * 4 / 2**30:.1f} GB)")
