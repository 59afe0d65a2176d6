#!/usr/bin/env bash
# Sets up a local venv (scripts/setup_env.sh, with PEFT as a contender), builds lrk
# and prints the benchmark table on whatever device is there (GPU if present);
# JSON goes to bench_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
LRK_EXTRA_PIP=${LRK_EXTRA_PIP:-peft} . scripts/setup_env.sh
mkdir -p bench_out
python -m benchmarks.bench_lora --json bench_out/bench_lora.json "$@"
python -m benchmarks.bench_sparse --json bench_out/bench_sparse.json "$@"
