#!/usr/bin/env bash
# Set up seqshard in ./.venv (or $VENV) on a machine with only Python (>= 3.10) and pip.
#
# The venv sees the system's site-packages, and an existing .venv is kept, so a torch that is
# already importable (installed system-wide, or into .venv beforehand) is used as it is.
# Only when none is does this install $TORCH_SPEC, by default torch==2.13.0, from the index pip
# is set up with. From the ordinary package index that is the CUDA build (about 20 nvidia
# packages, a ~5.3 GB venv); for the CPU build, install torch into .venv from PyTorch's CPU
# wheel index first, then run this (README.md, "torch"). A local wheel cache that holds a CPU
# build for this Python (as on the development machine, for Python 3.11 only) gives the CPU build.
#
# Knobs: PYTHON (the interpreter, default python3), VENV (the venv's folder, default .venv),
# TORCH_SPEC (above), EXTRAS (the extras installed with seqshard, default "test"; empty for
# seqshard alone, e.g. "test,gpu" adds triton).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-test}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
"$VPY" -c "import torch, ray, deepspeed; print(f'seqshard ready: torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v -i warning || true
