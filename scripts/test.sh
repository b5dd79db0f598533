#!/usr/bin/env bash
# The test command: sets up (venv, pinned torch, build; quick when already done), then runs the whole suite.
# Extra arguments go to pytest. CUDA tests skip with a reason when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
exec .venv/bin/python -m pytest tests -q "$@"
