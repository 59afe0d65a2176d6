#!/usr/bin/env bash
# Creates (or reuses) a local virtual environment with torch, the build tools and
# CUTLASS headers, then builds lrk's wheel (scripts/build_wheel.sh) and installs it
# into the venv: a regular, non-editable install, as a user gets it.
# Source it:  . scripts/setup_env.sh
#   LRK_VENV        venv folder (default .venv)
#   LRK_TORCH_SPEC  torch requirement (default torch==2.14.1; torch==2.13.0 gives the CPU-only wheel)
#   LRK_EXTRA_PIP   extra packages to install (e.g. "peft")
#   plus the build variables of setup.py (LRK_BUILD_CUDA, LRK_CUDA_ARCH_LIST, CUTLASS_DIR, MAX_JOBS)
set -e
_lrk_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_lrk_venv=${LRK_VENV:-$_lrk_root/.venv}
_lrk_python=${PYTHON:-python3}
if [ ! -x "$_lrk_venv/bin/python" ]; then
  echo "[setup] creating $_lrk_venv"
  "$_lrk_python" -m venv "$_lrk_venv"
fi
. "$_lrk_venv/bin/activate"
python -m pip install -q --upgrade pip "setuptools>=77" wheel >/dev/null
echo "[setup] installing ${LRK_TORCH_SPEC:-torch==2.14.1} and build/test tools"
python -m pip install -q "${LRK_TORCH_SPEC:-torch==2.14.1}" "cmake>=3.25.2" ninja pytest numpy ${LRK_EXTRA_PIP:-}
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
echo "[setup] building lrk's wheel"
_lrk_wheel=$(PYTHON=python bash "$_lrk_root/scripts/build_wheel.sh" | tail -n 1)
echo "[setup] installing $_lrk_wheel"
python -m pip install -q --no-deps --force-reinstall "$_lrk_wheel"
# From outside the tree, so that the check sees the installed package.
( cd / && python -c "import lrk, torch; print('[setup] lrk', lrk.__version__, 'from', lrk.__file__, '| torch', torch.__version__, '| CUDA kernels:', lrk.has_cuda_kernels())" )
set +e
