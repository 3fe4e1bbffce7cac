#!/usr/bin/env bash
# Installs the project and its test extras into the current Python.
# torch==2.13.0 (CPU) is installed first where that wheel is on the machine,
# so that the open requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0 \
    || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test]"
