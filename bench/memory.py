"""Peak extra memory of attention at B1 H8 L=S=16384 E64 float32 (issue 3's target: < 64 MB).

    python bench/memory.py

The growth of the process's peak resident set over one call, minus the
output it returns. A naive computation would hold the 8 GB of scores.
"""
import resource, time, numpy as np, attnkit
B, H, L, E = 1, 8, 16384, 64
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((B, H, L, E), dtype=np.float32) for _ in range(3))
attnkit.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # load everything
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
out = attnkit.scaled_dot_product_attention(q, k, v)
t = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"B1 H8 L=S=16384 E64 float32, {attnkit.get_num_threads()} threads: {t:.2f} s, "
      f"{4*B*H*L*L*E/t/1e9:.1f} GFLOP/s")
print(f"peak RSS grew {(after - before)/2**20:.1f} MB, of which the output is {out.nbytes/2**20:.1f} MB: "
      f"extra {(after - before - out.nbytes)/2**20:.1f} MB (naive scores: {B*H*L*L*4/2**30:.1f} GB)")
