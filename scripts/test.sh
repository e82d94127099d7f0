#!/usr/bin/env bash
# Set up (scripts/setup.sh), check lint, formatting and types, then run the test suite (what CI runs).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m eager` for the fast tier (tests/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest tests -q "$@"
