#!/usr/bin/env bash
# The whole GPU validation of obd_ext in one call, sized for one device
# command of at most 10 minutes (bench/gpu/README.md has the plan).
#
# Stages, in order, each under its own `timeout` cap and the whole run under
# --budget seconds (a stage that would start with less than its floor left is
# skipped and reported as such):
#   env         nvidia-smi, python, torch, nvcc, compute-sanitizer versions
#   build       obd_ext with its CUDA kernels for sm_90 on every core, or a
#               carried prebuilt _C (--prebuilt) if it loads; then every op
#               must have its CUDA kernel (bench/gpu/check_ops.py --cuda)
#   tests       pytest with CUDA, the kernel tests first, -x, per-test timeout
#   memcheck, racecheck, initcheck, synccheck
#               compute-sanitizer over bench/gpu/sanitize_driver.py (every
#               CUDA kernel on small and odd sizes)
#   ceilings    copy bandwidth and bf16 matmul rate (bench/gpu/ceilings.py)
#   select      global selection at N = 1e9 and N > 2^32 (bench/bench_select.py)
#   llm         7B-shaped layer-wise pruning (OBD, plain Wanda, the surgeon layerwise-obs; and the whole
#               prune_layerwise on a 1-block transformers Llama) + 2:4 semi-structured Linear (bench/bench_llm.py)
#   squared_mm  the curvature sweep's squared products (bench/bench_squared_mm.py)
#   curvature   hessian_diag against one backward (bench/gpu/bench_curvature_cuda.py)
# Logs and JSON go under --out; a tar.gz bundle of them and summary.txt are
# written last, and the summary table is printed last.
#
# --dry-run checks the plumbing on a machine without a GPU (CI): the same
# arguments, stage order, caps and bundling; the build stage imports the
# installed obd_ext and checks its CPU kernels; the tests stage runs one small
# test file; the sanitizer stages run the driver's CPU path on tiny sizes
# once (the other tools print the command they would run); the benchmarks run
# their CPU paths on tiny sizes. It takes about a minute.
#
# Usage: bench/gpu_suite.sh [--dry-run] [--out DIR] [--budget SECONDS] [--prebuilt PATH_TO_C_SO] [--jobs N]
# Exit status: 0 when every stage that ran passed (skips for lack of time
# included), 1 otherwise, 2 for bad arguments.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
OUT=/tmp/obd_gpu_suite
BUDGET=570
PREBUILT=""
JOBS=$(nproc 2>/dev/null || echo 4)
PY=${PYTHON:-python3}
RESERVE=10 # seconds kept for the bundle and the summary

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --prebuilt) PREBUILT=${2:?--prebuilt needs a path}; shift ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_suite.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case "$JOBS" in ''|*[!0-9]*) echo "gpu_suite.sh: --jobs must be a number, got '$JOBS'" >&2; exit 2 ;; esac
if [ -n "$PREBUILT" ] && [ ! -f "$PREBUILT" ]; then
  echo "gpu_suite.sh: --prebuilt '$PREBUILT' is not a file" >&2; exit 2
fi

rm -rf "$OUT"
mkdir -p "$OUT" || { echo "gpu_suite.sh: cannot create --out '$OUT'" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.tsv"
printf 'stage\tstatus\tseconds\tcap\n' > "$SUMMARY"
START=$(date +%s)
FAILED=0
BUILD_OK=1
export PYTHONUNBUFFERED=1
# On the GPU machine obd_ext is built in place, not installed: the scripts
# under bench/ and the tests find it through the repository root.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Packages the GPU image lacks travel as wheels in .whl (bench/gpu/README.md).
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/obd_site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/obd_site${PYTHONPATH:+:$PYTHONPATH}
fi

# stage NAME CAP FLOOR COMMAND: runs COMMAND (a bash string) under
# timeout min(CAP, time left), logging to $OUT/NAME.log.
stage() {
  local name=$1 cap=$2 floor=$3 cmd=$4
  local now left t0 rc status secs
  now=$(date +%s)
  left=$((BUDGET - (now - START) - RESERVE))
  if [ "$left" -lt "$floor" ]; then
    printf '%s\tSKIP(no time)\t0\t%s\n' "$name" "$cap" >> "$SUMMARY"
    echo "== $name: skipped, ${left}s left of the budget (needs ${floor}s)"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap ${cap}s)"
  echo "\$ $cmd" > "$OUT/$name.log"
  t0=$(date +%s)
  timeout -k 5 "$cap" bash -c "$cmd" >> "$OUT/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAIL(rc=$rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$cap" >> "$SUMMARY"
  echo "   $status in ${secs}s; last lines of $name.log:"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  return $rc
}

skip_all() {  # the stages that cannot run once the build failed
  for s in "$@"; do printf '%s\tSKIP(no build)\t0\t-\n' "$s" >> "$SUMMARY"; done
}

SAN_STAGES="memcheck racecheck initcheck synccheck"
BENCH_STAGES="ceilings select llm squared_mm curvature"

if [ "$DRY" = 1 ]; then
  # ---------------------------------------------------------------- dry run
  # Caps are generous here: the dry run checks the plumbing, not speed, and a
  # loaded CI machine can take 10 s to import torch.
  stage env 60 5 "$PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; command -v nvcc && nvcc --version | tail -1; command -v compute-sanitizer || echo 'compute-sanitizer: not here (dry run)'"
  stage build 120 10 "$PY bench/gpu/check_ops.py --json $OUT/ops.json" || BUILD_OK=0
  if [ "$BUILD_OK" = 1 ]; then
    stage tests 120 10 "$PY -m pytest -q -x -p no:cacheprovider tests/test_saliency_overflow.py -k 'old_rule or never_nan' --junitxml=$OUT/pytest.xml"
    stage memcheck 120 10 "$PY bench/gpu/sanitize_driver.py --device cpu --tiny --only saliency --only selection --json $OUT/sanitize_memcheck.json"
    for tool in racecheck initcheck synccheck; do
      stage "$tool" 10 2 "echo 'would run: compute-sanitizer --tool $tool --error-exitcode 3 $PY bench/gpu/sanitize_driver.py --device cuda --tiny'"
    done
    stage ceilings 60 5 "$PY bench/gpu/ceilings.py --device cpu --tiny --json $OUT/ceilings.json"
    stage select 120 10 "$PY bench/bench_select.py --quick --methods obd_ext --dists normal --json $OUT/select.json"
    stage llm 120 10 "$PY bench/bench_llm.py --device cpu --quick --patterns 2:4 --json $OUT/llm.json"
    stage squared_mm 10 2 "echo 'would run: $PY bench/bench_squared_mm.py --device cuda --dtype bfloat16 --repeats 3'"
    stage curvature 120 10 "$PY bench/gpu/bench_curvature_cuda.py --device cpu --tiny --repeats 1 --methods obd --json $OUT/curvature.json"
  else
    skip_all tests $SAN_STAGES $BENCH_STAGES
  fi
else
  # ---------------------------------------------------------------- GPU run
  stage env 20 5 "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version | tail -2; compute-sanitizer --version | head -2; nproc; free -g | head -2"
  BUILD="OBD_EXT_CUDA=1 OBD_EXT_CUDA_ARCH=9.0 MAX_JOBS=$JOBS $PY setup.py build_ext --inplace"
  CHECK="$PY bench/gpu/check_ops.py --cuda --json $OUT/ops.json"
  if [ -n "$PREBUILT" ]; then
    # A _C built elsewhere for this torch and Python (bench/gpu/check_cuda_build.sh);
    # if it does not load here, build from source.
    stage build 300 60 "rm -f obd_ext/_C*.so && cp '$PREBUILT' obd_ext/ && $CHECK || { echo 'prebuilt _C failed: building'; rm -f obd_ext/_C*.so; $BUILD && $CHECK; }" || BUILD_OK=0
  else
    stage build 300 60 "$BUILD && $CHECK" || BUILD_OK=0
  fi
  if [ "$BUILD_OK" = 1 ]; then
    KERNEL_TESTS="tests/test_saliency.py tests/test_saliency_overflow.py tests/test_select_global.py tests/test_select_segments.py tests/test_activation_kernel.py tests/test_softmax_kernel.py tests/test_layer_norm_kernel.py tests/test_cross_entropy_kernel.py tests/test_squared_mm.py tests/test_squared_conv.py tests/test_column_stats.py tests/test_opcheck_compile.py"
    TIMEOUT_OPT=$($PY -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=90")
    stage tests 150 30 "$PY -m pytest -q -x -p no:cacheprovider $TIMEOUT_OPT $KERNEL_TESTS --junitxml=$OUT/pytest_kernels.xml && $PY -m pytest -q -x -p no:cacheprovider $TIMEOUT_OPT tests --junitxml=$OUT/pytest_all.xml $(for f in $KERNEL_TESTS; do printf -- '--ignore=%s ' "$f"; done)"
    # The caching allocator would hide an out-of-bounds access inside a cached block.
    SAN="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 3 --print-limit 30"
    stage memcheck 90 20 "$SAN --tool memcheck $PY bench/gpu/sanitize_driver.py --device cuda --json $OUT/sanitize_memcheck.json"
    stage racecheck 30 15 "$SAN --tool racecheck $PY bench/gpu/sanitize_driver.py --device cuda --tiny --only saliency --only selection --json $OUT/sanitize_racecheck.json"
    stage initcheck 30 15 "$SAN --tool initcheck $PY bench/gpu/sanitize_driver.py --device cuda --tiny --json $OUT/sanitize_initcheck.json"
    stage synccheck 20 10 "$SAN --tool synccheck $PY bench/gpu/sanitize_driver.py --device cuda --tiny --only saliency --only selection --json $OUT/sanitize_synccheck.json"
    stage ceilings 25 10 "$PY bench/gpu/ceilings.py --device cuda --json $OUT/ceilings.json"
    stage select 75 20 "$PY bench/bench_select.py --device cuda --sizes 1e9,4.4e9 --dtypes fp32 --sparsities 0.5 --dists normal --repeats 3 --json $OUT/select.json"
    stage llm 150 20 "$PY bench/bench_llm.py --device cuda --semi --timed-blocks 1 --repeats 2 --methods obs,hf-obs,hf-obd --json $OUT/llm.json"
    stage squared_mm 25 10 "$PY bench/bench_squared_mm.py --device cuda --dtype bfloat16 --repeats 3 --json $OUT/squared_mm.json"
    stage curvature 40 15 "$PY bench/gpu/bench_curvature_cuda.py --device cuda --repeats 3 --json $OUT/curvature.json"
  else
    skip_all tests $SAN_STAGES $BENCH_STAGES
  fi
fi

TOTAL=$(($(date +%s) - START))
{
  echo "obd_ext GPU suite ($([ "$DRY" = 1 ] && echo dry run || echo GPU run)): ${TOTAL}s of a ${BUDGET}s budget"
  column -t -s "$(printf '\t')" "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
  echo "result: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
} > "$OUT/summary.txt"
(cd "$OUT" && find . -maxdepth 1 -type f ! -name gpu_suite_bundle.tar.gz | sort | tar -czf gpu_suite_bundle.tar.gz -T -)
echo "bundle: $OUT/gpu_suite_bundle.tar.gz ($(du -k "$OUT/gpu_suite_bundle.tar.gz" | cut -f1) KiB)"
cat "$OUT/summary.txt"
exit $FAILED
