#!/usr/bin/env bash
# Builds the emulated CUDA kernels (csrc/emu/README.md) into $LRK_EMU_LIBRARY_DIR
# (default python/lrk/, for a source-tree checkout on PYTHONPATH; scripts/test.sh
# sets build/emu-lib: they are test artifacts, never part of a wheel):
#   bash scripts/build_emulated.sh            -> <dir>/_C_emu.so
#   bash scripts/build_emulated.sh --sanitize -> <dir>/_C_emu_asan.so (AddressSanitizer + UBSan)
# Uses the python on PATH (the venv of scripts/setup_env.sh); MAX_JOBS as for the library.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${LRK_EMU_LIBRARY_DIR:-$ROOT/python/lrk}
mkdir -p "$OUT"
NAME=_C_emu
BUILD=$ROOT/build/emu
SANITIZE=""
if [ "${1:-}" = "--sanitize" ]; then
  NAME=_C_emu_asan
  BUILD=$ROOT/build/emu-asan
  SANITIZE="address,undefined"
fi
PY=${PYTHON:-python}
SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# The CMake that setup.py uses: LRK_CMAKE, else the pip package installed for this
# python, else the PATH's (CMakeLists.txt names the minimum version).
CMAKE=${LRK_CMAKE:-$($PY -c "import os, cmake; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || command -v cmake)}
LAUNCHER=()
if command -v ccache >/dev/null; then LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
GEN=()
if command -v ninja >/dev/null; then GEN=(-GNinja); fi
"$CMAKE" -S "$ROOT" -B "$BUILD" "${GEN[@]}" "${LAUNCHER[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$(command -v $PY)" -DLRK_BUILD_EMULATED=ON -DLRK_EMU_SANITIZE="$SANITIZE" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT" -DLRK_OUTPUT_NAME=$NAME -DLRK_OUTPUT_SUFFIX="$SUFFIX" >/dev/null
"$CMAKE" --build "$BUILD" --parallel "${MAX_JOBS:-$(nproc)}"
# The torch it was built against: lrk.emulated loads it only under that torch.
$PY -c "import torch; print(torch.__version__)" > "$OUT/$NAME.torch-version"
echo "[build_emulated] $OUT/$NAME$SUFFIX"
