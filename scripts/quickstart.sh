#!/usr/bin/env bash
# One command: set up on a fresh machine, then train the default experiment into ./mlflow.db.
# Extra arguments are Hydra overrides, e.g.  bash scripts/quickstart.sh norm=bn optim.lr=0.1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rescalelab-train "$@"
