#!/usr/bin/env bash
# One-shot GPU check for peftcore on a lent H100/H200 (Python 3.12, torch 2.11+cu130, nvcc 13.0, no internet).
# Usage: bash bench/device_check.sh OUTDIR
# Steps (each logged to OUTDIR/<step>.log, each under `timeout`; worst case 570 s in all):
#   cutlass  pip install the nvidia-cutlass wheel that travels with the tree ($CUTLASS_WHEEL, wheels/, or any
#            nvidia_cutlass*.whl under the repo), --no-deps --no-index
#   build    pip install --no-build-isolation --no-deps . with PEFTCORE_CUDA=ON, PEFTCORE_CUDA_ARCHS=90
#   tests    pytest -x -q tests -k cuda (junit xml in OUTDIR/junit-cuda.xml)
#   sanitize compute-sanitizer --tool memcheck python bench/sanitize_cases.py (plain run if the sanitizer cannot
#            run on this machine, e.g. a gVisor runtime answers "Device not supported")
#   racecheck compute-sanitizer --tool racecheck over the attention kernels only
#            (PEFTCORE_SANITIZE_ONLY=sparse_attn python bench/sanitize_cases.py): shared-memory hazards
#   bench    python bench/run.py --device cuda --out OUTDIR
# Prints a pass/fail summary last; exit status is non-zero when a step failed.
set -uo pipefail
OUT="${1:?usage: bash bench/device_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PEFTCORE_CUDA=ON PEFTCORE_CUDA_ARCHS=90 TORCH_CUDA_ARCH_LIST=9.0
[ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
declare -a SUMMARY=()
FAILED=0
T0=$SECONDS

# run_step NAME SECONDS CMD...: runs CMD under timeout, output to OUT/NAME.log, records the result.
run_step() {
  local name="$1" limit="$2"; shift 2
  local t=$SECONDS rc
  echo "== [$name] $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t)) res
  if [ $rc -eq 0 ]; then res=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then res="FAIL (timeout ${limit}s)"; else res="FAIL (rc=$rc)"; fi
  [ $rc -eq 0 ] || FAILED=1
  SUMMARY+=("$(printf '%-9s %-22s %4ss  %s' "$name" "$res" "$dt" "$name.log")")
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}
skip_step() { SUMMARY+=("$(printf '%-9s %-22s %4s   %s' "$1" "SKIP" "-" "$2")"); FAILED=1; }

{
  echo "date: $(date -u +%FT%TZ)"; uname -a; nvidia-smi -L 2>&1; nvcc --version 2>&1 | tail -1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" 2>&1
  cmake --version 2>&1 | head -1; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# (0) CUTLASS headers come from the wheel carried with the tree.
WHL="${CUTLASS_WHEEL:-}"
[ -n "$WHL" ] || WHL="$(ls wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)"
[ -n "$WHL" ] || WHL="$(find . -name 'nvidia_cutlass*.whl' -not -path './build/*' 2>/dev/null | head -1)"
if "$PY" -c "import cutlass_library" 2>/dev/null; then
  SUMMARY+=("$(printf '%-9s %-22s %4s   %s' cutlass "PASS (present)" "-" "")")
elif [ -n "$WHL" ]; then
  run_step cutlass 30 "$PY" -m pip install --no-deps --no-index "$WHL"
else
  skip_step cutlass "no nvidia_cutlass*.whl found (set CUTLASS_WHEEL); CUTLASS kernels will be off"
fi

# (a) build
BUILD_OK=0
run_step build 160 "$PY" -m pip install -v --no-build-isolation --no-deps . && BUILD_OK=1
if [ $BUILD_OK = 1 ]; then
  (cd /tmp && "$PY" -c "import torch, peftcore._C as c; print('with_cuda', c.with_cuda(), 'archs', c.cuda_archs())") \
    >>"$OUT/build.log" 2>&1
  tail -n 1 "$OUT/build.log"
fi

if [ $BUILD_OK = 1 ]; then
  # (b) CUDA-parametrised tests
  run_step tests 90 "$PY" -m pytest -x -q tests -k cuda -p no:cacheprovider --junitxml="$OUT/junit-cuda.xml"
  # (c) memcheck over every sparse_delta op (falls back to a plain run when the sanitizer cannot attach)
  if command -v compute-sanitizer >/dev/null 2>&1; then
    run_step sanitize 80 compute-sanitizer --tool memcheck --error-exitcode 3 --leak-check no \
      "$PY" bench/sanitize_cases.py
    if grep -q "Device not supported\|Unable to find\|Target application terminated before first instrumented API call" "$OUT/sanitize.log"; then
      unset 'SUMMARY[${#SUMMARY[@]}-1]'
      echo "    compute-sanitizer cannot run here; plain run instead"
      run_step sanitize_plain 30 "$PY" bench/sanitize_cases.py
      SUMMARY+=("$(printf '%-9s %-22s %4s   %s' sanitize "SKIP (unsupported)" "-" "sanitize.log")")
    fi
    # (c') racecheck over the attention kernels (shared-memory tiles, barriers), when memcheck could attach
    if ! grep -q "Device not supported\|Unable to find\|Target application terminated before first instrumented API call" "$OUT/sanitize.log"; then
      run_step racecheck 90 env PEFTCORE_SANITIZE_ONLY=sparse_attn compute-sanitizer --tool racecheck \
        --error-exitcode 3 "$PY" bench/sanitize_cases.py
    fi
  else
    run_step sanitize_plain 30 "$PY" bench/sanitize_cases.py
    skip_step sanitize "compute-sanitizer not on PATH"
  fi
  # (d) GPU benches
  if [ -f bench/run.py ]; then
    run_step bench 90 "$PY" bench/run.py --device cuda --rounds 2 --out "$OUT"
  else
    skip_step bench "bench/run.py missing"
  fi
else
  skip_step tests "build failed"; skip_step sanitize "build failed"; skip_step bench "build failed"
fi

echo
echo "== device_check summary ($((SECONDS - T0))s, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
