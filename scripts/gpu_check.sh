#!/usr/bin/env bash
# The one command a GPU session runs: build lathe for the GPU, run every GPU test file in its
# own process, then the kernel benchmark (and the end-to-end one if present). Budget: <= 8 min
# on one H200, build included. Run it from anywhere; it works in the repository root.
set -u -o pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--dry-run] [--quick] [--skip-build] [--out DIR]

Steps (each with its own time limit; a failing step is reported and the next one still runs):
  1. build   pip install -e . --no-deps --no-build-isolation --no-index into $PYTHON (default
             python3), LATHE_CUDA=1 LATHE_CUDA_ARCHS=90 (override with LATHE_CUDA_ARCHS); if the
             CUDA build fails, once more with LATHE_CUDA=0 so the Triton parts still get tested
  2. tests   every tests/ file that has GPU tests, one pytest process per file (a crash does
             not hide the other files), run concurrently, LATHE_TRITON_AUTOTUNE=0
  3. bench   python -m lathe.bench.gpu_kernels --out DIR --budget 200 -> DIR/gpu-<device>.{md,json}
  4. e2e     python -m lathe.bench.gpu_e2e --out DIR, if that module exists (time limit 180 s)
Writes DIR/gpu-check-<device>.md (default DIR: bench/results): what ran, pass/fail per file.

  --dry-run     print the steps and check that the files they need exist; run nothing
  --quick       the benchmark's small shape set
  --skip-build  lathe is already installed in $PYTHON
  --out DIR     results folder (default bench/results)
Environment: PYTHON (interpreter with torch + triton), LATHE_CUDA_ARCHS (default 90).
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="bench/results"
DRY=0; QUICK=0; BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --skip-build) BUILD=0 ;;
    --out) shift; OUT="${1:?--out needs a folder}" ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT" || exit 2

# Kernel test files run whole (with a GPU present their tests run on it); other files with
# GPU tests run their `gpu`-marked tests only.
KERNEL_TESTS=(tests/test_triton_qmatmul.py tests/test_triton_attention.py tests/test_cuda_kernels.py
              tests/test_fp8_op.py tests/test_packing.py)
gpu_test_files() {
  for f in "${KERNEL_TESTS[@]}"; do [ -e "$f" ] && echo "$f"; done
  grep -l -E "pytest\.mark\.gpu" tests/test_*.py | grep -v -x -F -f <(printf '%s\n' "${KERNEL_TESTS[@]}") | sort
}
marker_for() {  # pytest arguments for one file
  case " ${KERNEL_TESTS[*]} " in *" $1 "*) echo "$1" ;; *) echo "-m gpu $1" ;; esac
}

E2E_MODULE="bench/gpu_e2e.py"
NEEDED=(setup.py bench/gpu_kernels.py tests/conftest.py kernels/triton_kernels/qmatmul.py
        kernels/triton_kernels/attention.py csrc/cuda/bindings_cuda.cpp)

if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run in $ROOT"
  missing=0
  for f in "${NEEDED[@]}"; do
    if [ -e "$f" ]; then echo "  found   $f"; else echo "  MISSING $f"; missing=1; fi
  done
  echo "1. build: LATHE_CUDA=1 LATHE_CUDA_ARCHS=${LATHE_CUDA_ARCHS:-90} $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .  (limit 240 s)"
  echo "2. tests, one process each, concurrently (limit 150 s each):"
  n=0
  for f in $(gpu_test_files); do echo "     $PY -P -m pytest -q -p no:cacheprovider $(marker_for "$f")"; n=$((n + 1)); done
  [ "$n" -gt 0 ] || { echo "  MISSING: no GPU test files found"; missing=1; }
  echo "3. bench: $PY -m lathe.bench.gpu_kernels --out $OUT --budget 200$([ "$QUICK" = 1 ] && echo ' --quick')  (limit 260 s)"
  if [ -e "$E2E_MODULE" ]; then
    echo "4. e2e:   $PY -m lathe.bench.gpu_e2e --out $OUT  (limit 180 s)"
  else
    echo "4. e2e:   skipped ($E2E_MODULE not in this checkout)"
  fi
  [ "$missing" = 0 ] && echo "dry run ok" || echo "dry run: files missing"
  exit "$missing"
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
SUMMARY=()
note() { echo "[gpu_check $(elapsed)s] $*"; SUMMARY+=("$*"); }

"$PY" - <<'EOF' || { echo "gpu_check: $PY cannot import torch"; exit 2; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF

# 1. build ---------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  export LATHE_CUDA_ARCHS="${LATHE_CUDA_ARCHS:-90}"
  if LATHE_CUDA=1 timeout 240 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
       >"$LOGS/build.log" 2>&1; then
    note "build: ok (LATHE_CUDA=1, archs $LATHE_CUDA_ARCHS)"
  else
    note "build: CUDA build FAILED (tail of the log below); retrying with LATHE_CUDA=0"
    tail -n 30 "$LOGS/build.log"
    if LATHE_CUDA=0 timeout 180 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
         >"$LOGS/build0.log" 2>&1; then
      note "build: ok without the CUDA extension"
    else
      tail -n 30 "$LOGS/build0.log"; note "build: FAILED"; exit 1
    fi
  fi
fi
SLUG=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if torch.cuda.is_available() else 'no-gpu')")

# 2. tests, one process per file ----------------------------------------------------------
export LATHE_TRITON_AUTOTUNE=0
pids=(); files=()
if "$PY" -c "import pytest" 2>/dev/null; then
  for f in $(gpu_test_files); do
    log="$LOGS/$(basename "$f" .py).log"
    # shellcheck disable=SC2046  # marker_for's words are separate arguments
    timeout 150 "$PY" -P -m pytest -q -p no:cacheprovider $(marker_for "$f") >"$log" 2>&1 &
    pids+=($!); files+=("$f")
  done
else
  note "tests: SKIPPED, pytest is not installed in $PY"
fi
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  f="${files[$i]}"; log="$LOGS/$(basename "$f" .py).log"
  last=$(grep -E "passed|failed|error|no tests ran" "$log" | tail -n 1)
  case $rc in
    0) note "tests $f: ok ($last)" ;;
    124) note "tests $f: TIMED OUT after 150 s ($last)" ;;
    139|134) note "tests $f: CRASHED (exit $rc)" ;;
    *) note "tests $f: FAILED exit $rc ($last)"; grep -E "^(FAILED|ERROR)" "$log" | head -n 15 ;;
  esac
done
unset LATHE_TRITON_AUTOTUNE

# 3. kernel benchmark ---------------------------------------------------------------------
mkdir -p "$OUT"
q=(); [ "$QUICK" = 1 ] && q=(--quick)
if timeout 260 "$PY" -m lathe.bench.gpu_kernels --out "$OUT" --budget 200 "${q[@]}" 2>&1 | tee "$LOGS/bench.log"; then
  note "bench: wrote $OUT/gpu-$SLUG.{md,json}"
else
  note "bench: FAILED or timed out (exit ${PIPESTATUS[0]})"
fi

# 4. end to end (#16), when the module exists ---------------------------------------------
if [ -e "$E2E_MODULE" ]; then
  if timeout 180 "$PY" -m lathe.bench.gpu_e2e --out "$OUT" 2>&1 | tee "$LOGS/e2e.log"; then
    note "e2e: ok"
  else
    note "e2e: FAILED or timed out (exit ${PIPESTATUS[0]})"
  fi
else
  note "e2e: skipped ($E2E_MODULE not in this checkout)"
fi

REPORT="$OUT/gpu-check-$SLUG.md"
{
  echo "# gpu_check on $SLUG ($(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s)"
  echo
  for s in "${SUMMARY[@]}"; do echo "- $s"; done
  echo
  echo "Logs: $LOGS"
} >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
echo "gpu_check: done in $(elapsed) s; summary in $REPORT, logs in $LOGS"
