#!/usr/bin/env bash
# Create .venv (if needed) and install rescalelab with its dev tools into it. Idempotent.
# TORCH_SPEC overrides the torch/torchvision pair (default: the builds this project is tested on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[dev]"
