#!/usr/bin/env bash
# Create .venv (if needed) and install rescalelab with its dev tools into it. Idempotent.
# TORCH_SPEC overrides the torch/torchvision pair (default: the builds this project is tested on);
# RESCALELAB_EXTRAS the extras (default dev; scripts/test.sh adds team: PostgreSQL, S3 clients).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[${RESCALELAB_EXTRAS:-dev}]"
echo "setup done: run 'source .venv/bin/activate' once in this shell for rescalelab-train, mlflow, jupyter" >&2
