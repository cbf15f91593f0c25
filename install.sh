#!/usr/bin/env bash
# Set up seqshard in ./.venv on a machine with only Python (>= 3.10) and pip.
#
# The venv sees the system's site-packages, so a torch you already have is used as it is.
# Only when no torch is importable does this install one: $TORCH_SPEC, by default the CPU
# build torch==2.13.0 (on a CUDA machine, set TORCH_SPEC=torch to get the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install --quiet -e ".[test]"
"$VPY" -c "import torch, ray, deepspeed; print(f'seqshard ready: torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v -i warning || true
