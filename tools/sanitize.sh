#!/usr/bin/env bash
# tools/sanitize.sh: build attnkit with AddressSanitizer + UndefinedBehaviorSanitizer
# and run the test suite under them.
#
#   bash tools/sanitize.sh            (from anywhere; it works on the repo it lives in)
#
# Exits non-zero if the build fails, if any test fails, or if any sanitizer
# report appears (in this process or in any subprocess a test starts).
#
# Environment (all optional):
#   PYTHON                    interpreter to make the venv from (default: python3)
#   ATTNKIT_SANITIZE_VENV     venv to (re)use (default: <repo>/.venv-sanitize,
#                             git-ignored by `.venv*/`)
#   ATTNKIT_SANITIZE_PYTEST   extra pytest arguments (e.g. "-k softmax")
#
# What runs: the whole suite, `python -m pytest tests -x -q -p no:cacheprovider`.
# Under ASan it takes a few minutes on 2 cores; no subset is needed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${ATTNKIT_SANITIZE_VENV:-$ROOT/.venv-sanitize}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnkit-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/reports          # sanitizer reports land here, one file per process
mkdir -p "$LOGS"
START=$SECONDS

say() { printf '== sanitize: %s\n' "$*"; }
die() { printf '== sanitize: FAILED: %s\n' "$*" >&2; exit 1; }

# --- the sanitizer runtimes --------------------------------------------------
# The extension is built by gcc with -fsanitize=address,undefined, which links
# the shared libasan and libubsan. CPython is not built with ASan, so libasan
# must be preloaded: it has to be the first library in the process to
# intercept malloc & co. before anything else allocates. libubsan is
# preloaded too so that its runtime (and UBSAN_OPTIONS) is set up at start-up
# rather than at dlopen time of the extension.
CC=${CC:-gcc}
command -v "$CC" >/dev/null || die "$CC not found"
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
UBSAN_LIB=$("$CC" -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    # -print-file-name echoes the bare name back when it finds nothing
    [[ "$lib" == /* && -e "$lib" ]] || die "sanitizer runtime $lib not found (install gcc's libasan/libubsan)"
done
ASAN_LIB=$(readlink -f "$ASAN_LIB")
UBSAN_LIB=$(readlink -f "$UBSAN_LIB")

# --- the virtual environment -------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV" \
        || die "could not create a venv with '$PYTHON -m venv' (on Debian: apt-get install python3-venv)"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip

# --- the build ---------------------------------------------------------------
# pip builds the wheel in an isolated environment (scikit-build-core, Cython,
# NumPy from PyPI) and in a fresh build directory, so nothing of an earlier
# unsanitized build can leak in; a local directory is always rebuilt.
say "building attnkit with ATTNKIT_SANITIZE=ON"
BUILD_LOG=$VENV/sanitize-build.log   # kept, for a look at the compile lines
# install.strip=false: scikit-build-core strips installed binaries by default,
# which would throw away the -g line tables and leave reports with bare
# offsets ("_kernels...so+0x83f26") instead of csrc/softmax.c:98.
if ! ATTNKIT_SANITIZE=ON "$VPY" -m pip install -v \
        -C build.verbose=true -C install.strip=false ".[test]" >"$BUILD_LOG" 2>&1; then
    tail -n 80 "$BUILD_LOG" >&2
    die "build failed (log above)"
fi
grep -E -q -- '-fsanitize=address,undefined' "$BUILD_LOG" \
    || { tail -n 80 "$BUILD_LOG" >&2; die "the build log shows no -fsanitize flags"; }
say "build done ($((SECONDS - START)) s)"

# --- the run -----------------------------------------------------------------
# detect_leaks=0: CPython and NumPy leave allocations behind at exit on
#   purpose; LeakSanitizer would report those, none of which are ours.
# abort_on_error / halt_on_error: the first report kills the process.
# log_path: reports go to files (<prefix>.<pid>) as well as failing the
#   process, so a report in a subprocess whose stderr a test swallowed, or in a
#   forked child, is still seen. Any such file fails the run.
# strict_string_checks=0, detect_odr_violation=0 and the rest are ASan's
#   defaults, stated here only where they matter.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_stacktrace=1:symbolize=1:detect_stack_use_after_return=0:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:symbolize=1:log_path=$LOGS/ubsan"
PYTEST_ARGS=(tests -x -q -p no:cacheprovider)
if [[ -n "${ATTNKIT_SANITIZE_PYTEST:-}" ]]; then
    read -r -a extra <<<"$ATTNKIT_SANITIZE_PYTEST"
    PYTEST_ARGS+=("${extra[@]}")
fi

# Sanity: the installed extension really is the sanitized build, and the
# preloaded runtime is live in the interpreter.
LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}" "$VPY" - <<'EOF' \
    || die "the installed attnkit is not a sanitized build, or it does not load under ASan"
import ctypes, attnkit
info = attnkit.show_config(mode="dicts")
assert info["build"]["sanitized"], "attnkit was built without ATTNKIT_SANITIZE"
ctypes.CDLL(None).__asan_init  # the ASan runtime is in the process
print("== sanitize: attnkit", info["version"], "sanitized; SIMD paths this CPU runs:",
      ", ".join(info["simd"]["supported_by_cpu"]), "; threads:", info["threads"]["num_threads"])
EOF

say "running: python -m pytest ${PYTEST_ARGS[*]}"
set +e
LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}" \
    "$VPY" -m pytest "${PYTEST_ARGS[@]}"
status=$?
set -e

reports=$(find "$LOGS" -type f -size +0c | sort)
if [[ -n "$reports" ]]; then
    for f in $reports; do
        printf '\n== sanitize: report %s\n' "$(basename "$f")" >&2
        cat "$f" >&2
    done
    die "sanitizer report(s) above (pytest exit status $status)"
fi
if [[ $status -ne 0 ]]; then
    die "pytest exited with status $status"
fi
say "OK: no sanitizer reports, all tests passed ($((SECONDS - START)) s)"
