#!/usr/bin/env bash
# The main job: the benchmark suite. Sets up (as scripts/test.sh), then runs bench/run.py: a table on screen,
# rows appended to bench/out/bench_<device>.csv and a chart in bench/out/bench_<device>.png (bench/out is not
# tracked; the recorded figures in bench/results/ come from a run with --out bench/results).
# Extra arguments go to bench/run.py (--device cuda, --quick, --only FAMILY ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
exec .venv/bin/python bench/run.py "$@"
