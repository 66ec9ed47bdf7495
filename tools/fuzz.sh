#!/usr/bin/env bash
# tools/fuzz.sh: run the coverage-guided fuzzer (fuzz/fuzz_attnkit.py, atheris)
# over attnkit's kernels, modules and loaders, under AddressSanitizer + UBSan.
#
#   bash tools/fuzz.sh                      (60 s, the sanitized build)
#   ATTNKIT_FUZZ_SECONDS=600 bash tools/fuzz.sh
#   ATTNKIT_FUZZ_NATIVE=1 bash tools/fuzz.sh   (no sanitizers: the current
#                                           python's attnkit, e.g. the dev venv)
#
# Exits non-zero on any finding: a crash, a sanitizer report, an unexpected
# exception or a failed invariant (the harness's docstring lists them). The
# input that found it is saved in $ATTNKIT_FUZZ_ARTIFACTS (and printed in
# base64 in the log); turn it into a test in tests/test_fuzz_regressions.py.
# Prints the number of executions, the rate, the coverage (cov/ft) and how
# many inputs the run added to the corpus.
#
# What is guided and what is sanitized. The sanitized run is both at once:
#   - guided: atheris instruments the bytecode of attnkit's Python code (and of
#     json and zipfile, which the loaders parse with) and feeds the branches it
#     takes to its libFuzzer as 8-bit counters; libFuzzer keeps an input that
#     reaches new ones. The C kernels are not traced (gcc has no libFuzzer
#     coverage mode): the Python layer's branches over shapes, strides, dtypes,
#     masks and SIMD paths are what steer the search into them.
#   - sanitized: the C extension is tools/sanitize.sh's ASan + UBSan build,
#     with the same preloaded gcc runtimes, options and report checks (this
#     script asks it to build only, ATTNKIT_SANITIZE_BUILD_ONLY=1, then to run
#     the fuzzer in place of the tests, ATTNKIT_SANITIZE_NO_BUILD=1).
# The one trick: libasan carries weak, empty __sanitizer_cov_* callbacks, and
# whichever library comes first in the process gets atheris' calls. Preloaded
# first as usual, libasan took them, and the run was blind ("Coverage symbols
# are being provided by a library other than libFuzzer", no new units). So
# atheris' own core_with_libfuzzer module is preloaded ahead of libasan
# (ATTNKIT_SANITIZE_PRELOAD_FIRST; ASan's link-order check is off for it), and
# the harness tells atheris to use that module (Setup(internal_libfuzzer=True)).
# The run fails if atheris still warns that the callbacks come from elsewhere.
#
# Environment (all optional):
#   ATTNKIT_FUZZ_SECONDS   how long to fuzz (default 60): libFuzzer -max_total_time
#   ATTNKIT_FUZZ_VENV      the sanitized venv (default <repo>/.venv-fuzz); an
#                          existing sanitized one, e.g. CI's sanitizer venv, is
#                          reused as it is when ATTNKIT_FUZZ_REUSE=1
#   ATTNKIT_FUZZ_REUSE=1   do not rebuild attnkit in the venv (only install atheris)
#   ATTNKIT_FUZZ_NATIVE=1  no sanitizers: run with ${PYTHON:-python3} as it is
#                          (coverage-guided too, 5-15 times faster)
#   ATTNKIT_FUZZ_CORPUS    a directory to grow the corpus in and keep (default:
#                          a scratch copy of fuzz/corpus/, removed at the end)
#   ATTNKIT_FUZZ_HARNESS   the script to run (default fuzz/fuzz_attnkit.py; e.g. a
#                          wrapper that imports it and patches a known bug)
#   ATTNKIT_FUZZ_ARGS      extra libFuzzer arguments (e.g. "-seed=1")
#   ATTNKIT_FUZZ_ARTIFACTS where crash-*, timeout-*, oom-* inputs go
#                          (default ${TMPDIR:-/tmp}/attnkit-fuzz-artifacts)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECONDS_WANTED=${ATTNKIT_FUZZ_SECONDS:-60}
VENV=${ATTNKIT_FUZZ_VENV:-$ROOT/.venv-fuzz}
START=$SECONDS
say() { printf '== fuzz: %s\n' "$*"; }
die() { printf '== fuzz: FAILED: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnkit-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ARTIFACTS=${ATTNKIT_FUZZ_ARTIFACTS:-${TMPDIR:-/tmp}/attnkit-fuzz-artifacts}/
mkdir -p "$ARTIFACTS"
# the corpus grows in a scratch copy (or ATTNKIT_FUZZ_CORPUS): fuzz/corpus/
# holds only the seeds
CORPUS=${ATTNKIT_FUZZ_CORPUS:-$WORK/corpus}
mkdir -p "$CORPUS"
cp -n fuzz/corpus/* "$CORPUS"/ 2>/dev/null || true

# -timeout: one input taking this long is a hang; -rss_limit_mb: ASan's shadow
# memory and quarantine make the process large; -max_len: inputs up to 8 KiB
# (enough for a mutated file and for every shape the harness draws)
FUZZ_ARGS=(-max_total_time="$SECONDS_WANTED" -timeout=60 -rss_limit_mb=6144 -max_len=8192
           -print_final_stats=1 -artifact_prefix="$ARTIFACTS")
if [[ -n "${ATTNKIT_FUZZ_ARGS:-}" ]]; then
    read -r -a extra <<<"$ATTNKIT_FUZZ_ARGS"
    FUZZ_ARGS+=("${extra[@]}")
fi
LOG=$WORK/fuzz.log
HARNESS=${ATTNKIT_FUZZ_HARNESS:-fuzz/fuzz_attnkit.py}

if [[ "${ATTNKIT_FUZZ_NATIVE:-0}" == 1 ]]; then
    PY=${PYTHON:-python3}
    "$PY" -c 'import atheris' 2>/dev/null || "$PY" -m pip install -q atheris
    say "native run, $SECONDS_WANTED s, $("$PY" -c 'import attnkit; print(attnkit.__file__)')"
    set +e
    timeout -s ABRT -k 30 $((SECONDS_WANTED + 300)) "$PY" "$HARNESS" "${FUZZ_ARGS[@]}" "$CORPUS" 2>&1 \
        | grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' | tee "$LOG"
    status=${PIPESTATUS[0]}
    set -e
else
    if [[ "${ATTNKIT_FUZZ_REUSE:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
        ATTNKIT_SANITIZE_BUILD_ONLY=1 ATTNKIT_SANITIZE_VENV="$VENV" bash tools/sanitize.sh
    fi
    "$VENV/bin/python" -c 'import atheris' 2>/dev/null || "$VENV/bin/python" -m pip install -q atheris
    # atheris' libFuzzer, the very file `import atheris.core_with_libfuzzer` loads
    CORE=$("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("atheris.core_with_libfuzzer").origin)')
    say "sanitized run, $SECONDS_WANTED s, in $VENV"
    set +e
    ATTNKIT_SANITIZE_NO_BUILD=1 ATTNKIT_SANITIZE_VENV="$VENV" ATTNKIT_SANITIZE_PRELOAD_FIRST="$CORE" \
        ATTNKIT_SANITIZE_TIMEOUT=$((SECONDS_WANTED + 300)) \
        bash tools/sanitize.sh "$VENV/bin/python" "$HARNESS" "${FUZZ_ARGS[@]}" "$CORPUS" 2>&1 \
        | grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' | tee "$LOG"
    status=${PIPESTATUS[0]}
    set -e
fi

runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -n 1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOG" | tail -n 1)
added=$(sed -n 's/^stat::new_units_added: *//p' "$LOG" | tail -n 1)
cov=$(grep -E '^#[0-9]+\s+DONE' "$LOG" | tail -n 1 | sed -E 's/.*(cov: [0-9]+ ft: [0-9]+ corp: [^ ]+).*/\1/')
say "executions: ${runs:-?} (${rate:-?}/s); ${cov:-}; new units: ${added:-?}; corpus: $(ls "$CORPUS" | wc -l) files"
if ((status != 0)) || grep -q -E 'Uncaught Python exception|ERROR: libFuzzer|ERROR: AddressSanitizer|runtime error:' "$LOG"; then
    ls "$ARTIFACTS" >&2
    die "a finding (exit status $status); the input is in $ARTIFACTS: replay it with
    python fuzz/fuzz_attnkit.py <that file>"
fi
# a run whose coverage feedback went elsewhere (see the header) fuzzed blind
if grep -q 'Coverage symbols are being provided by a library other than' "$LOG"; then
    die "atheris' coverage callbacks are not its libFuzzer's: the run was not coverage-guided"
fi
say "OK: no finding ($((SECONDS - START)) s)"
