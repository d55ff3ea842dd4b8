#!/usr/bin/env bash
# The full CUDA build of obd_ext, without a GPU: against a CUDA build of torch
# (the GPU machine's: torch 2.11.0 for CUDA 13.0) in a scratch virtual
# environment outside the repository, with the CUDA kernels forced on for
# sm_90; then the library is imported and every op is checked to have its CUDA
# kernel registered (bench/gpu/check_ops.py --cuda). Loading the library needs
# no GPU: kernels register when it loads.
#
# Never run in CI: creating the environment downloads several GB. The build
# happens in a copy of the working tree under BUILD_DIR, so the repository's
# in-place obd_ext/_C*.so (the CPU build everyone imports) is never touched.
#
# Usage: bench/gpu/check_cuda_build.sh [VENV [BUILD_DIR]]
#   VENV       default /work/cudaenv (created with python3.12 if missing)
#   BUILD_DIR  default /tmp/obd_cuda_build
#   MAX_JOBS   parallel compile jobs (default 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${1:-/work/cudaenv}
BUILD=${2:-/tmp/obd_cuda_build}
PY=${PYTHON:-python3.12}
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with torch 2.11.0 (a CUDA 13.0 build on PyPI; several GB)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.11.0 numpy tqdm setuptools wheel ninja
fi
"$VENV/bin/python" - <<'PYEOF'
import torch
print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
assert torch.version.cuda is not None, "this torch is a CPU build: a CUDA build is needed"
PYEOF
command -v nvcc >/dev/null || { echo "nvcc not found (set CUDA_HOME or PATH)"; exit 1; }
nvcc --version | tail -1
# torch guesses CUDA_HOME from nvcc's folder: /usr/local/bin/nvcc gives
# /usr/local, which has no cuda_runtime.h. Take the first folder that has it.
if [ -z "${CUDA_HOME:-}" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_HOME=$c; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-not found}"

echo "== copying the working tree to $BUILD/src (keeping its build/ objects from an earlier run)"
mkdir -p "$BUILD"
rm -rf "$BUILD/objects"
[ -d "$BUILD/src/build" ] && mv "$BUILD/src/build" "$BUILD/objects"
rm -rf "$BUILD/src"
mkdir -p "$BUILD/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '^shared/' \
  | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$BUILD/src"
[ -d "$BUILD/objects" ] && mv "$BUILD/objects" "$BUILD/src/build"

echo "== building (OBD_EXT_CUDA=1 OBD_EXT_CUDA_ARCH=9.0 MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
(cd "$BUILD/src" && OBD_EXT_CUDA=1 OBD_EXT_CUDA_ARCH=9.0 "$VENV/bin/python" setup.py build_ext --inplace) > "$BUILD/build.log" 2>&1 || {
  tail -60 "$BUILD/build.log"; echo "BUILD FAILED (full log: $BUILD/build.log)"; exit 1; }
end=$(date +%s)
echo "built in $((end - start)) s (log: $BUILD/build.log)"
ls -l "$BUILD"/src/obd_ext/_C*.so

echo "== import and per-op CUDA kernel check"
# The build is in place, not installed: the copy's root goes on the path.
(cd "$BUILD/src" && PYTHONPATH="$BUILD/src" "$VENV/bin/python" bench/gpu/check_ops.py --cuda --json "$BUILD/check_ops.json")
echo "CUDA BUILD OK: $((end - start)) s with MAX_JOBS=$MAX_JOBS"
