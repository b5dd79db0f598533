#!/usr/bin/env bash
# The main job: the benchmark suite. Sets up (as scripts/test.sh), then runs bench/run.py. By default the headline
# comparisons (one per family, about 3 minutes on 2 cores); --full runs every case (about 10 minutes).
# Output: a table and the headline summary on screen; the CSV (every row records the machine), summary_<device>.md
# / .csv and the chart in a new bench/out/<UTC time>/ (bench/out/latest points at it). bench/out is not tracked:
# a run never modifies the repository; the recorded figures in bench/results/ come from a run with
# --out bench/results.
# Extra arguments go to bench/run.py (--full, --device cuda, --quick, --only FAMILY ..., --out DIR; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
exec .venv/bin/python bench/run.py "$@"
