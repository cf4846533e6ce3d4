#!/usr/bin/env bash
# One command: set up on a fresh machine, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
exec .venv/bin/python -m pytest "$@"
