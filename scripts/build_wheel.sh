#!/usr/bin/env bash
# Builds lrk's binary wheel for the torch installed in the active python (venv):
#   bash scripts/build_wheel.sh            -> dist/lrk-0.1.0+cu130torch2.14-<python>-<platform>.whl
#   bash scripts/build_wheel.sh --sdist    -> also dist/lrk-0.1.0.tar.gz (builds from source the same way)
# The wheel has CUDA kernels when nvcc is found and torch has CUDA (LRK_BUILD_CUDA=AUTO),
# else it is CPU-only (+cputorch2.13). The build variables of setup.py apply
# (LRK_BUILD_CUDA, LRK_CUDA_ARCH_LIST, CUTLASS_DIR, MAX_JOBS). Each configuration
# keeps its own CMake folder under build/, so a rebuild recompiles only what changed
# (and ccache serves a fresh clone). The wheel's path is the last line printed.
#   LRK_WHEEL_DIR   where the wheel and sdist go (default dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${LRK_WHEEL_DIR:-$ROOT/dist}
PY=${PYTHON:-python}
mkdir -p "$OUT"
# setuptools copies the Python sources into build/lib* and packs what is there:
# start from an empty copy so that a file deleted from the tree leaves the wheel too.
rm -rf "$ROOT"/build/lib* "$ROOT"/build/bdist*
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PY -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$TMP" "$ROOT" >&2
WHEEL=$(ls "$TMP"/lrk-*.whl)
# What the wheel must hold and must not: the library and its build record; no
# emulated test libraries.
$PY - "$WHEEL" >&2 <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
problems = []
if not any(n.startswith("lrk/_C.") and n.endswith(".so") for n in names):
    problems.append("no lrk/_C*.so")
if "lrk/_build.json" not in names:
    problems.append("no lrk/_build.json")
problems += [f"test artifact {n}" for n in names if n.startswith("lrk/_C_emu") or n.endswith(".torch-version")]
if problems:
    sys.exit(f"[build_wheel] {sys.argv[1]}: " + "; ".join(problems))
print(f"[build_wheel] {len(names)} files, library and build record present, no test artifacts")
EOF
mv -f "$WHEEL" "$OUT/"
if [ "${1:-}" = "--sdist" ]; then
  $PY -m pip install -q build >&2
  $PY -m build --sdist --no-isolation --outdir "$OUT" "$ROOT" >&2
fi
echo "$OUT/$(basename "$WHEEL")"
