#!/usr/bin/env bash
# Create .venv and install imgclf with its test tools and the optional extras the tests cover.
# Safe to re-run. IMGCLF_EXTRAS picks the extras (default: dev,ray,coreml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned first so pip takes the local CPU wheel, never a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${IMGCLF_EXTRAS:-dev,ray,coreml}]"
