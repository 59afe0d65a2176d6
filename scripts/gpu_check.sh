#!/usr/bin/env bash
# GPU check: build lrk with every core, run the whole test suite (CUDA tests
# included) and the benchmarks, and leave logs and JSON under $OUT (or ./gpu_out).
# Works offline: CUTLASS comes from a carried wheel (.carry/nvidia_cutlass-*.whl)
# or CUTLASS_DIR, everything else from the machine's Python environment.
#
#   bash scripts/gpu_check.sh            # full check
#   LRK_GPU_CHECK_BENCH=0 bash scripts/gpu_check.sh   # tests only
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

{
  log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"

# CUTLASS headers from the carried wheel.
if [ -z "${CUTLASS_DIR:-}" ]; then
  whl=$(ls "$ROOT"/.carry/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/lrk_cutlass "$whl" >/dev/null 2>&1 || true
    export CUTLASS_DIR=/tmp/lrk_cutlass/cutlass_library/source
  fi
fi
log "CUTLASS_DIR=${CUTLASS_DIR:-<wheel lookup>}"

# Build in place (python/lrk/_C*.so) with all cores.
log "build"
BUILD=$ROOT/build/gpu
export LRK_PTXAS_VERBOSE=1
SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
rm -f "$ROOT"/python/lrk/_C*.so
t0=$(date +%s)
( cmake -S "$ROOT" -B "$BUILD" -GNinja -DPython3_EXECUTABLE="$(command -v $PY)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/python/lrk" -DLRK_OUTPUT_SUFFIX="$SUFFIX" \
    -DLRK_BUILD_CUDA=ON -DLRK_CUDA_ARCH_LIST="${LRK_CUDA_ARCH_LIST:-9.0a}" ${CUTLASS_DIR:+-DCUTLASS_DIR=$CUTLASS_DIR} \
  && cmake --build "$BUILD" --parallel "${MAX_JOBS:-$(nproc)}" -- -v ) > "$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - t0 )) s"
grep -E "registers|spill|Compiling entry|error" "$OUT/build.log" | grep -v "^--" | head -60 > "$OUT/ptxas.txt" || true
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi

export PYTHONPATH=$ROOT/python:$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}
log "tests"
t0=$(date +%s)
$PY -m pytest -q -x -p no:cacheprovider tests --junitxml="$OUT/tests.xml" -rs 2>&1 | tail -40 | tee "$OUT/tests.txt"
log "tests done in $(( $(date +%s) - t0 )) s"

if [ "${LRK_GPU_CHECK_BENCH:-1}" = "1" ]; then
  log "benchmarks"
  $PY -m benchmarks.bench_lora ${LRK_BENCH_ARGS:-} --json "$OUT/bench_lora.json" 2>&1 | grep -v Warning | tee "$OUT/bench_lora.txt"
  $PY -m benchmarks.bench_sparse ${LRK_BENCH_ARGS:-} --json "$OUT/bench_sparse.json" 2>&1 | grep -v Warning | tee "$OUT/bench_sparse.txt"
fi
log "done"
