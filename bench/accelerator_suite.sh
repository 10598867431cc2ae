#!/usr/bin/env bash
# The benchmark suite on one GPU or TPU host (< 10 minutes): train, score and memory benches at the
# 3B/7B shapes next to transformers, plus the host-side scoring cost. Writes suite.json and suite.md.
#   bash bench/accelerator_suite.sh --out runs/bench
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/accelerator_suite.py "$@"
