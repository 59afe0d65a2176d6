#!/usr/bin/env bash
# Sets up a local venv (scripts/setup_env.sh, with PEFT as a contender), builds lrk
# and prints the benchmark tables on whatever device is there (GPU if present);
# JSON goes to bench_out/, with PNG charts of each benchmark's ratios beside it
# (benchmarks/plot.py, drawn from the JSON). LRK_BENCHES picks the benchmarks (default: fused LoRA,
# QLoRA and the sparse SDDMM; "all" runs every benchmarks/bench_*.py). Extra arguments go
# to each benchmark (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
LRK_EXTRA_PIP=${LRK_EXTRA_PIP:-peft bitsandbytes matplotlib} . scripts/setup_env.sh
mkdir -p bench_out
benches=${LRK_BENCHES:-bench_lora bench_qlora bench_sparse}
if [ "$benches" = "all" ]; then
  benches=$(cd benchmarks && ls bench_*.py | sed 's/\.py$//')
fi
n=$(echo $benches | wc -w)
i=0
for b in $benches; do
  i=$((i + 1))
  echo "[bench] $b ($i of $n)"
  python -m "benchmarks.$b" --json "bench_out/$b.json" "$@"
  python -m benchmarks.plot "bench_out/$b.json"
done
