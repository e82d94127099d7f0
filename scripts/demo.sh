#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: train a small GPT-2 on key-value recall (once; cached in
# <out>/model), then activation patching over every layer and position, eager, compiled and with plain hooks;
# the finding is printed and the heatmaps are written to <out>/ (default demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m intervene_compiler.demo --out "${1:-demo_out}"
