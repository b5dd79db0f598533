#!/usr/bin/env bash
# The GPU check of peftcore, in one run of at most 8 minutes on one H100 / H200 (x86-64, 16 cores, no internet).
#
#   bash bench/device_check.sh OUTDIR                   # on the GPU machine
#   bash bench/device_check.sh --dry OUTDIR             # rehearsal without a GPU (what tests/test_device_check.py runs)
#   bash bench/device_check.sh --archive F.tar.gz OUTDIR    # also pack OUTDIR into F.tar.gz after every step
#
# Steps (each logged to OUTDIR/<step>.log under `timeout`; results in OUTDIR/steps.csv, summary last on screen
# and in OUTDIR/summary.txt):
#   env       machine, driver, python / torch / nvcc versions, git commit
#   cutlass   the CUTLASS headers: the nvidia-cutlass wheel that travels with the tree ($CUTLASS_WHEEL, or any
#             nvidia_cutlass*.whl under the repo, .whl/ and wheels/ first), pip --no-deps --no-index; nothing to do
#             when cutlass_library is already importable
#   build     pip install --no-build-isolation --no-deps . for sm_90 only (PEFTCORE_CUDA_ARCHS=90), all cores
#             (MAX_JOBS, CMAKE_BUILD_PARALLEL_LEVEL)
#   import    peftcore._C loads outside the tree and reports CUDA on, its archs and CUTLASS
#   tests     every CUDA test (pytest -k cuda), no stop at a failure, pytest-xdist workers when installed;
#             junit xml OUTDIR/junit-cuda.xml; bench/device_check_plugin.py records the collected ids and each
#             result as it comes and skips what would start past the step's deadline
#   memcheck  compute-sanitizer --tool memcheck over bench/sanitize_cases.py (small cases of every CUDA op), run
#             beside the tests; a plain run when the sanitizer cannot attach here
#   racecheck compute-sanitizer --tool racecheck over the attention kernels (PEFTCORE_SANITIZE_ONLY=sparse_attn)
#   bench     python bench/run.py --device cuda --headline over every family (alone on the GPU, after the rest):
#             the headline comparisons, one per family, with their summary table: OUTDIR/bench_cuda.{csv,png},
#             OUTDIR/summary_cuda.{md,csv} (the full suite, `bash scripts/bench.sh --device cuda --full`, does not
#             fit this script's time)
#   report    the per-op PASS / FAIL table from the junit xml: OUTDIR/ops.csv (bench/device_check_report.py)
#
# Time: each step has a limit (LIMIT below); tests run beside memcheck + racecheck, so the worst case is
# env + cutlass + build + import + max(tests, memcheck + racecheck) + bench + report + 20 s of glue <= 480 s.
# Every limit is also cut to what is left of PEFTCORE_CHECK_BUDGET (default 480 s) from the start.
#
# --dry runs every step that needs no GPU and rehearses the rest: the command lines the real run would execute
# are checked (programs on PATH, files in the tree, Python modules importable, `bash -n` of this script), the
# CUTLASS wheel is looked up (pip install --dry-run when one is found), the build's pip command runs with
# --dry-run, the import check runs against the installed build, pytest collects every CUDA test with the real
# run's options (--collect-only), bench/sanitize_cases.py compiles and runs on the CPU
# (PEFTCORE_SANITIZE_DEVICE=cpu), the bench entry points import and answer --help, and the junit
# post-processing builds ops.csv from a synthetic junit xml (all collected tests passed but one planted
# failure and one skip) and must flag the planted failure.
#
# Env: PYTHON (default python3), CUTLASS_WHEEL, PEFTCORE_CHECK_JOBS (pytest workers, default 6),
# PEFTCORE_CHECK_BUDGET (seconds, default 480). The summary ends with "result: PASS" (every step passed, every
# CUDA op's tests too), "result: INCOMPLETE" (a step was skipped, e.g. a sanitizer that cannot instrument the
# machine) or "result: FAIL"; the exit status is 0 for PASS only.
set -uo pipefail

usage() { echo "usage: bash bench/device_check.sh [--dry] [--archive FILE.tar.gz] OUTDIR"; }
DRY=0 ARCHIVE="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --archive) ARCHIVE="${2:-}"; [ -n "$ARCHIVE" ] || { usage >&2; exit 2; }; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "device_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { usage >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
if [ -n "$ARCHIVE" ]; then
  mkdir -p "$(dirname "$ARCHIVE")" && ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")" || exit 2
fi
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # steps run from other dirs
NPROC="$(nproc 2>/dev/null || echo 4)"
JOBS="${PEFTCORE_CHECK_JOBS:-6}"
BUDGET="${PEFTCORE_CHECK_BUDGET:-480}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PEFTCORE_CUDA=ON PEFTCORE_CUDA_ARCHS=90 TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS="$NPROC" CMAKE_BUILD_PARALLEL_LEVEL="$NPROC"
[ -d /usr/local/cuda ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

# Limits in seconds (each includes 5 s for `timeout --kill-after`).
# sanitize_plain (when the sanitizer cannot run) takes the place of memcheck + racecheck; sanitize-coverage is
# a dry-run step.
declare -A LIMIT=([env]=15 [cutlass]=20 [build]=180 [import]=20 [tests]=150 [memcheck]=90 [racecheck]=55
                  [sanitize_plain]=40 [sanitize-coverage]=15 [bench]=60 [report]=15)
GLUE=20
WORST=$(( LIMIT[env] + LIMIT[cutlass] + LIMIT[build] + LIMIT[import] + LIMIT[bench] + LIMIT[report] + GLUE ))
SAN=$(( LIMIT[memcheck] + LIMIT[racecheck] ))
WORST=$(( WORST + (LIMIT[tests] > SAN ? LIMIT[tests] : SAN) ))
# A dry run does different, CPU-bound work on what may be a slow shared machine: its steps get at least 150 s.
if [ "$DRY" = 1 ]; then for k in "${!LIMIT[@]}"; do [ "${LIMIT[$k]}" -ge 150 ] || LIMIT[$k]=150; done; fi
T0=$SECONDS
DEADLINE=$(( T0 + BUDGET - LIMIT[report] - 5 ))
STEPS="$OUT/steps.csv"
echo "step,result,seconds,limit,log" >"$STEPS"
: >"$OUT/summary.txt"
rm -f "$OUT/tests-collected.txt" "$OUT/tests-progress.tsv" "$OUT/junit-cuda.xml" "$OUT/junit-synthetic.xml" \
  "$OUT/ops.csv"

record() {  # record NAME RESULT SECONDS LIMIT LOG (no commas in RESULT)
  echo "$1,${2//,/;},$3,$4,$5" >>"$STEPS"
}

pack() {
  [ -n "$ARCHIVE" ] || return 0
  local tmp="$ARCHIVE.$BASHPID.tmp"
  tar czf "$tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null; mv -f "$tmp" "$ARCHIVE"
}

# limit_of NAME: the step's limit, cut to what is left before the deadline.
limit_of() {
  local l=${LIMIT[$1]:?"device_check: no time limit for step $1"} left=$(( DEADLINE - SECONDS ))
  [ "$1" = report ] && left=$(( left + LIMIT[report] ))
  [ "$1" = bench ] && [ "$DRY" != 1 ] && l=$left  # the last step: LIMIT[bench] is its guaranteed minimum
  echo $(( l < left ? l : left ))
}

# run_step NAME CMD...: CMD under timeout (the step's limit), output to OUT/NAME.log, result to steps.csv.
run_step() {
  local name="$1"; shift
  local limit t=$SECONDS rc res
  limit=$(limit_of "$name")
  if [ "$limit" -lt 10 ]; then
    record "$name" "FAIL (no time left)" 0 "$limit" ""
    return 1
  fi
  local shown="$*"
  [ "${#shown}" -le 200 ] || shown="${shown:0:200}..."
  echo "== [$name] ${shown//$'\n'/ } (limit ${limit}s)"
  timeout --kill-after=5 "$((limit - 5))" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then res=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then res="FAIL (timeout ${limit}s)"
  else res="FAIL (rc=$rc)"; fi
  [ "$DRY" = 1 ] && [ $rc -eq 0 ] && res="DRY ok"
  record "$name" "$res" "$((SECONDS - t))" "$limit" "$name.log"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  pack
  return $rc
}

# check_cmd CMD...: the dry run's check of a command line the real run executes: the program exists (GPU-only
# tools may be absent), every argument naming a file of the tree exists, `python -m X` modules and python
# scripts resolve (scripts are byte-compiled).
GPU_ONLY_TOOLS="compute-sanitizer nvidia-smi"
check_cmd() {
  local prog prev="" a bad=0
  [ "$1" = env ] && shift
  while [[ "$1" == [A-Z_]*=* ]]; do shift; done
  prog="$1"
  if ! command -v "$prog" >/dev/null 2>&1; then
    case " $GPU_ONLY_TOOLS " in
      *" $prog "*) echo "    (dry) $prog is not here; the GPU machine has it" ;;
      *) echo "    (dry) ERROR: program not found: $prog"; bad=1 ;;
    esac
  fi
  for a in "$@"; do
    a="${a#--junitxml=}"
    case "$a" in
      bench/*|tests/*|scripts/*|csrc/*|python/*)
        if [ ! -e "$a" ]; then echo "    (dry) ERROR: no such file in the tree: $a"; bad=1
        elif [[ "$a" == *.py ]] && ! "$PY" -m py_compile "$a"; then echo "    (dry) ERROR: $a does not compile"; bad=1
        fi ;;
    esac
    if [ "$prev" = "-m" ] && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$a') is None)"; then
      echo "    (dry) ERROR: python module not found: $a"; bad=1
    fi
    if [ "$prev" = "-p" ] && [ "$a" != "no:cacheprovider" ] && \
        ! PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import $a" 2>/dev/null; then
      echo "    (dry) ERROR: pytest plugin not importable: $a"; bad=1
    fi
    prev="$a"
  done
  echo "    (dry) checked: $*"
  return $bad
}

# dry_check NAME CMD...: in a dry run, check CMD (see check_cmd) and record the step as rehearsed.
dry_check() {
  local name="$1"; shift
  if check_cmd "$@" >"$OUT/$name.log" 2>&1; then record "$name" "DRY ok (command checked)" 0 0 "$name.log"
  else record "$name" "FAIL (dry: command line)" 0 0 "$name.log"; fi
  cat "$OUT/$name.log"
}

sanitizer_unsupported() {  # the sanitizer could not instrument this machine (e.g. a gVisor runtime)
  grep -q "Device not supported\|Unable to find\|Target application terminated before first instrumented API call" "$1"
}

echo "== device_check $([ "$DRY" = 1 ] && echo "--dry ")$OUT (budget ${BUDGET}s, worst case ${WORST}s, $NPROC cores)"
if [ "$DRY" = 1 ]; then
  if ! bash -n "$SELF"; then record syntax "FAIL (bash -n)" 0 0 ""; fi
  if [ "$WORST" -gt "$BUDGET" ]; then record budget "FAIL (worst case ${WORST}s > ${BUDGET}s)" 0 0 ""; fi
fi

# ---- env
run_step env bash -c '
  echo "date: $(date -u +%FT%TZ)"; uname -a; echo "cores: $(nproc)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; else echo "nvidia-smi: not here"; fi
  nvcc --version 2>&1 | tail -1
  "$0" -c "import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO GPU\")"
  cmake --version 2>&1 | head -1; ninja --version 2>&1 | sed "s/^/ninja /"
  "$0" -c "import importlib.util as u; print(\"pytest-xdist\", bool(u.find_spec(\"xdist\")), \"pytest-timeout\", bool(u.find_spec(\"pytest_timeout\")))"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
' "$PY"
cat "$OUT/env.log"

# ---- cutlass
WHL="${CUTLASS_WHEEL:-}"
[ -n "$WHL" ] || WHL="$(ls .whl/nvidia_cutlass-*.whl wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)"
[ -n "$WHL" ] || WHL="$(find . \( -path ./build -o -path ./.venv -o -path ./.git \) -prune -o -name 'nvidia_cutlass*.whl' -print \
  2>/dev/null | head -1)"
CUTLASS_CMD=("$PY" -m pip install --no-deps --no-index "$WHL")
if "$PY" -c "import cutlass_library" 2>/dev/null; then
  record cutlass "PASS (present)" 0 0 ""
  [ -z "$WHL" ] || echo "    (cutlass_library present; $WHL not needed)"
elif [ -n "$WHL" ] && [ ! -f "$WHL" ]; then
  record cutlass "FAIL (no such wheel: $WHL)" 0 0 ""
elif [ -n "$WHL" ] && [ "$DRY" = 1 ]; then
  run_step cutlass "${CUTLASS_CMD[@]}" --dry-run --target "$OUT/cutlass-dry"
elif [ -n "$WHL" ]; then
  run_step cutlass "${CUTLASS_CMD[@]}"
else
  record cutlass "FAIL (no nvidia_cutlass*.whl in the tree; set CUTLASS_WHEEL)" 0 0 ""
fi

# ---- build (sm_90 only)
BUILD_CMD=("$PY" -m pip install -v --no-build-isolation --no-deps .)
BUILD_OK=0
if [ "$DRY" = 1 ]; then
  {
    echo "would run: PEFTCORE_CUDA=$PEFTCORE_CUDA PEFTCORE_CUDA_ARCHS=$PEFTCORE_CUDA_ARCHS MAX_JOBS=$MAX_JOBS CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL ${BUILD_CMD[*]}"
    check_cmd "${BUILD_CMD[@]}" && check_cmd cmake --version && check_cmd ninja --version &&
      "$PY" -c "import torch, scikit_build_core; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  } >"$OUT/build-check.log" 2>&1
  cat "$OUT/build-check.log"
  if grep -q "ERROR\|Traceback" "$OUT/build-check.log"; then record build-check "FAIL (dry: command line)" 0 0 build-check.log; fi
  run_step build "${BUILD_CMD[@]}" --dry-run && BUILD_OK=1
else
  run_step build "${BUILD_CMD[@]}" && BUILD_OK=1
fi

# ---- import (outside the tree, so the installed package is what loads)
if [ $BUILD_OK = 1 ]; then
  run_step import bash -c 'cd / && "$0" -c "
import sys, torch, peftcore
info = peftcore.build_info()
print(info)
print(\"peftcore from\", peftcore.__file__)
if sys.argv[1] == \"0\":  # the real run needs the CUDA kernels; a dry run takes the build it finds
    assert info[\"with_cuda\"], \"peftcore was built without its CUDA kernels\"
    assert torch.cuda.is_available(), \"torch sees no GPU\"
" "$1"' "$PY" "$DRY"
else
  record import "SKIP (build failed)" 0 0 ""
fi

# ---- tests (beside memcheck + racecheck)
TEST_CMD=(env PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest tests -k cuda -q -rfE
          -p no:cacheprovider -p device_check_plugin --junitxml="$OUT/junit-cuda.xml")
if "$PY" -c "import xdist" 2>/dev/null; then TEST_CMD+=(-n "$JOBS"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_CMD+=(--timeout 100); fi
export PEFTCORE_CHECK_COLLECTED="$OUT/tests-collected.txt" PEFTCORE_CHECK_PROGRESS="$OUT/tests-progress.tsv"
MEMCHECK_CMD=(compute-sanitizer --tool memcheck --error-exitcode 3 --leak-check no "$PY" bench/sanitize_cases.py)
RACECHECK_CMD=(env PEFTCORE_SANITIZE_ONLY=sparse_attn compute-sanitizer --tool racecheck --error-exitcode 3
               "$PY" bench/sanitize_cases.py)
PLAIN_CMD=("$PY" bench/sanitize_cases.py)

sanitizers() {
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    record memcheck "FAIL (compute-sanitizer not on PATH)" 0 0 ""
    run_step sanitize_plain "${PLAIN_CMD[@]}"
    return
  fi
  run_step memcheck "${MEMCHECK_CMD[@]}"
  if sanitizer_unsupported "$OUT/memcheck.log"; then
    echo "    compute-sanitizer cannot instrument this machine; plain run instead"
    record memcheck "SKIP (sanitizer unsupported here)" 0 0 memcheck.log
    run_step sanitize_plain "${PLAIN_CMD[@]}"
    record racecheck "SKIP (sanitizer unsupported here)" 0 0 ""
  else
    run_step racecheck "${RACECHECK_CMD[@]}"
  fi
}

sanitizers_dry() {
  dry_check memcheck "${MEMCHECK_CMD[@]}"
  dry_check racecheck "${RACECHECK_CMD[@]}"
  printf '========= COMPUTE-SANITIZER\n========= Error: Device not supported\n' >"$OUT/sanitizer-probe.log"
  sanitizer_unsupported "$OUT/sanitizer-probe.log" || record sanitizer-probe "FAIL (unsupported-device pattern)" 0 0 ""
  rm -f "$OUT/sanitizer-probe.log"
  run_step sanitize_plain env PEFTCORE_SANITIZE_DEVICE=cpu "${PLAIN_CMD[@]}"  # the cases themselves, on the CPU
  # every CUDA op is called by the sanitizer cases
  run_step sanitize-coverage "$PY" -c "
import re, sys
sys.path.insert(0, 'bench')
import device_check_report as r
src = open('bench/sanitize_cases.py').read()
missing = [op for op in r.cuda_ops() if not re.search(r'ops\.' + op + r'\b', src)]
print('bench/sanitize_cases.py calls every CUDA op' if not missing else 'not called: ' + ' '.join(missing))
sys.exit(1 if missing else 0)"
}

if [ "$DRY" = 1 ] || [ $BUILD_OK = 1 ]; then
  LIMIT[tests]=$(limit_of tests)
  export PEFTCORE_CHECK_DEADLINE=$(( $(date +%s) + LIMIT[tests] - 25 ))
  if [ "$DRY" = 1 ]; then sanitizers_dry >"$OUT/sanitizers.out" 2>&1 &
  else sanitizers >"$OUT/sanitizers.out" 2>&1 &
  fi
  SAN_PID=$!
  if [ "$DRY" = 1 ]; then
    run_step tests "${TEST_CMD[@]}" --collect-only  # the real run's pytest command, collecting only
    n=$(wc -l <"$OUT/tests-collected.txt" 2>/dev/null || echo 0)
    echo "    collected $n CUDA tests"
    [ "$n" -gt 0 ] || record tests-collected "FAIL (no CUDA test collected)" 0 0 tests.log
  else
    run_step tests "${TEST_CMD[@]}"
  fi
  wait "$SAN_PID"
  cat "$OUT/sanitizers.out"  # the sanitizer steps recorded themselves in steps.csv; the summary reads it
else
  record tests "SKIP (build failed)" 0 0 ""; record memcheck "SKIP (build failed)" 0 0 ""
fi
unset PEFTCORE_CHECK_DEADLINE

# ---- bench (alone on the GPU)
# The headline comparisons of every family (the summary table); run.py writes the CSV family by family, and the
# bench takes all the time left.
BENCH_CMD=("$PY" bench/run.py --device cuda --rounds 2 --out "$OUT" --headline
           --only sparse_attn blockdiag sparse_delta partial orthogonal token_elim s2ft lora)
if [ "$DRY" = 1 ]; then
  dry_check bench-cmd "${BENCH_CMD[@]}"
  run_step bench bash -c '"$0" bench/run.py --help >/dev/null && "$0" -c "
import sys; sys.path.insert(0, \"bench\")
import importlib, run, common
for fam in run.FAMILIES:
    m = importlib.import_module(\"bench_\" + fam)
    assert callable(m.run), fam
only = sys.argv[sys.argv.index(\"--only\") + 1:]
assert \"--headline\" in sys.argv, \"the bench command runs the headline comparisons\"
assert sorted(only) == sorted(run.FAMILIES), (\"the bench command must run every family\", only)
print(\"bench entry points import:\", \", \".join(run.FAMILIES))
" "$@"' "$PY" "${BENCH_CMD[@]:1}"
elif [ $BUILD_OK = 1 ]; then
  run_step bench "${BENCH_CMD[@]}"
else
  record bench "SKIP (build failed)" 0 0 ""
fi

# ---- report: the per-op table
REPORT=("$PY" bench/device_check_report.py --collected "$OUT/tests-collected.txt" --csv "$OUT/ops.csv")
if [ "$DRY" = 1 ]; then
  if "$PY" bench/device_check_report.py --synthetic "$OUT/tests-collected.txt" --junit "$OUT/junit-synthetic.xml" \
      >"$OUT/report-synthetic.log" 2>&1; then
    run_step report "${REPORT[@]}" --junit "$OUT/junit-synthetic.xml"
    # exactly one FAIL row (the planted failure), and every CUDA op named by some test
    [ "$(grep -c ',FAIL,' "$OUT/ops.csv" 2>/dev/null)" = 1 ] && grep -q ",FAIL,.*planted failure" "$OUT/ops.csv" ||
      record report-planted "FAIL (ops.csv does not show the planted failure alone)" 0 0 report.log
    ! grep -q ',NO TESTS,' "$OUT/ops.csv" || record report-coverage "FAIL (a CUDA op no test names)" 0 0 ops.csv
  else
    record report "FAIL (synthetic junit)" 0 0 report-synthetic.log
  fi
elif [ -f "$OUT/junit-cuda.xml" ] || [ -s "$OUT/tests-progress.tsv" ]; then
  if run_step report "${REPORT[@]}" --junit "$OUT/junit-cuda.xml" --progress "$OUT/tests-progress.tsv"; then
    ops_line="$(grep '^ops:' "$OUT/report.log" | tail -1)"
    case "$ops_line" in *FAIL*|*INCOMPLETE*|*"NO TESTS"*) record report "FAIL (${ops_line#ops: })" 0 0 report.log ;; esac
  fi
else
  record report "SKIP (no test results)" 0 0 ""
fi

# ---- summary (a step recorded twice keeps its last result: memcheck on a machine the sanitizer cannot instrument)
FINAL="$(awk -F, 'NR > 1 { if (!($1 in r)) o[n++] = $1; r[$1] = $0 } END { for (i = 0; i < n; i++) print r[o[i]] }' "$STEPS")"
RESULT=PASS
echo "$FINAL" | cut -d, -f2 | grep -q '^SKIP' && RESULT="INCOMPLETE (steps skipped)"
echo "$FINAL" | cut -d, -f2 | grep -qv '^\(PASS\|DRY\|SKIP\)' && RESULT=FAIL
{
  echo
  [ -f "$OUT/report.log" ] && sed -n '/^per-op/,/^ops:/p' "$OUT/report.log"
  echo
  echo "== device_check $([ "$DRY" = 1 ] && echo "(dry) ")summary: $((SECONDS - T0))s of ${BUDGET}s, logs in $OUT"
  echo "$FINAL" | while IFS=, read -r s r t l log; do
    printf '%-15s %-45s %5ss  %s\n' "$s" "$r" "$t" "$log"
  done
  echo "result: $RESULT"
} | tee "$OUT/summary.txt"
pack
[ "$RESULT" = PASS ]
