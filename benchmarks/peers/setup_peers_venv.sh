#!/usr/bin/env bash
# Create .peers-venv (git-ignored) holding the peer libraries, never our own dependencies.
#
# torch: the peers must run on the same torch 2.13.0 (CPU build) as datainf. PyPI's torch==2.13.0 wheel for
# Linux pulls ~3 GB of CUDA packages, and the CPU-only wheel index is not reachable here, so the peers venv
# reuses the main venv's packages (torch 2.13.0+cpu, transformers, peft, numpy, ...) through a .pth file and
# pip installs only what the peers add on top. Their own installs shadow the main venv's where they differ.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VENV=$ROOT/.peers-venv
"$PY" -m venv "$VENV"
MAIN_SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
PEER_SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
echo "$MAIN_SITE" > "$PEER_SITE/_main_venv.pth"
"$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__; print("torch", torch.__version__)'
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install "kronfluence==1.0.1" "dattri==0.3.0" "pydvl[influence]==0.10.0" "torch==2.13.0+cpu" ${PIP_EXTRA:-}
# dattri pulls PyPI's torchvision, built for the CUDA torch: its ops fail to register on our CPU torch and
# break `import transformers` ("operator torchvision::nms does not exist"). None of the code used needs it.
"$VENV/bin/pip" uninstall -y torchvision
"$VENV/bin/python" -c 'import torch, kronfluence, dattri, pydvl; print("torch", torch.__version__, "peers ok")'
