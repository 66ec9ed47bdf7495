"""One measurement in a fresh process: the benchmark scripts' workers (a
Python source given with -c) run through here, each held to `threads`
threads by the environment as well as by its own setting, and print one
JSON number."""
import json
import os
import subprocess
import sys


def run_worker(source, threads, *args):
    """json.loads of what `python -c source *args` prints, OpenBLAS and
    OpenMP limited to `threads`; the worker's error ends the benchmark."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", source, *map(str, args)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"a benchmark worker failed ({' '.join(map(str, args))}):\n{out.stderr}")
    return json.loads(out.stdout)
