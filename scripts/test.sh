#!/usr/bin/env bash
# Sets up a local venv (scripts/setup_env.sh), builds lrk and runs the test suite.
# CUDA tests run when a GPU is present and are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# PEFT (with transformers) is needed by the PEFT-integration and adapter-loading tests.
LRK_EXTRA_PIP=${LRK_EXTRA_PIP:-peft} . scripts/setup_env.sh
python -m pytest -q -rs tests "$@"
