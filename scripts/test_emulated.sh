#!/usr/bin/env bash
# The CUDA kernels on the CPU emulator (csrc/emu/README.md), beyond what
# scripts/test.sh runs (every test's emu device, threads in shuffled order):
#   1. the emu tests again with threads in forward and in reverse order;
#   2. the emulated library built with AddressSanitizer + UBSan, and a bounded
#      set of emu tests against it: any finding aborts the run.
# Run after scripts/test.sh (it uses that venv and its installed lrk). LRK_EMU_SANITIZE_TESTS
# overrides the sanitized test selection (pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
. "${LRK_VENV:-.venv}/bin/activate"
# lrk from the venv (the wheel scripts/test.sh installed); the emulated libraries
# from where scripts/test.sh builds them.
export LRK_EMU_LIBRARY_DIR=${LRK_EMU_LIBRARY_DIR:-$PWD/build/emu-lib}
for order in forward reverse; do
  echo "=== emulated CUDA kernels, threads in $order order"
  t0=$(date +%s)
  LRK_EMU_ORDER=$order python -m pytest -q -m emu -p no:cacheprovider tests
  echo "[test_emulated] $order order: $(( $(date +%s) - t0 )) s"
done

echo "=== emulated CUDA kernels under AddressSanitizer + UBSan"
bash scripts/build_emulated.sh --sanitize
# One test id per line: parametrized ids may hold spaces (a shape "(3, 8)").
if [ -n "${LRK_EMU_SANITIZE_TESTS:-}" ]; then
  read -r -a SELECTION <<< "$LRK_EMU_SANITIZE_TESTS"
else
  mapfile -t SELECTION < <(python -m pytest --collect-only -q -m emu -p no:cacheprovider tests 2>/dev/null \
    | python scripts/sanitized_selection.py)
fi
echo "[test_emulated] sanitized run: ${#SELECTION[@]} tests"
t0=$(date +%s)
# The sanitizer runtime must come first; libstdc++ with it, so that its
# exception interceptors find the functions they wrap (python itself does not
# link libstdc++). Leaks: the interpreter's own allocations at exit are not
# lrk's. Any other finding stops the process, which fails the run.
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
LD_PRELOAD=$PRELOAD ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 LRK_EMU_SANITIZED=1 LRK_EMU_ORDER=shuffled LRK_EMU_SEED=5 \
  python -m pytest -q -m emu -p no:cacheprovider "${SELECTION[@]}"
echo "[test_emulated] sanitized: $(( $(date +%s) - t0 )) s"
