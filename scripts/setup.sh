#!/usr/bin/env bash
# Create .venv and install imgclf with its test tools and the optional extras the tests cover.
# Safe to re-run. IMGCLF_EXTRAS picks the extras (default: dev,ray,coreml). Quiet unless a step
# fails: then that step's whole log is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
step() {
  if ! "$@" >"$LOG" 2>&1; then
    echo "setup.sh: failed: $*" >&2
    cat "$LOG" >&2
    exit 1
  fi
}
[ -x .venv/bin/python ] || step "$PY" -m venv .venv
step .venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned first so pip takes the local CPU wheel, never a CUDA build.
step .venv/bin/python -m pip install -q "torch==2.13.0"
step .venv/bin/python -m pip install -q -e ".[${IMGCLF_EXTRAS:-dev,ray,coreml}]"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import imgclf; print("imgclf", imgclf.__version__)'))"
