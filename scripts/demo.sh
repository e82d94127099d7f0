#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: activation patching on a tiny local GPT-2, heatmap to demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m intervene_compiler.demo --out "${1:-demo_out}"
