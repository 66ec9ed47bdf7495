"""Write fuzz/corpus/: a few seed inputs for fuzz/fuzz_attnkit.py, made here
rather than copied from elsewhere: a tiny valid .safetensors and .npz behind
the byte that selects each loader's raw-bytes target (libFuzzer mutates
them from there), and one short input for each other target.

    python fuzz/make_corpus.py      (needs atheris and attnkit importable)
"""
import io
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_attnkit as fa  # noqa: E402
from attnkit import io as akio  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def file_bytes(ext):
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2.0]),
             "i": np.array([[1, 2]], dtype=np.int64), "m": np.array([True, False])}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seed" + ext)
        akio.save_state_dict(state, path)
        with open(path, "rb") as f:
            return f.read()


def main():
    os.makedirs(HERE, exist_ok=True)
    seeds = {"safetensors": fa.target_byte("t_load_safetensors_raw") + file_bytes(".safetensors"),
             "npz": fa.target_byte("t_load_npz_raw") + file_bytes(".npz")}
    for f in fa.KERNEL_TARGETS:
        seeds[f.__name__] = fa.target_byte(f.__name__) + bytes(range(1, 40))
    for name, data in seeds.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {HERE}")


if __name__ == "__main__":
    main()
