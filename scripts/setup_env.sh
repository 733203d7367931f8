#!/usr/bin/env bash
# Creates the virtual environment $1 (default .venv) and installs dlkernels into it, editable.
# With a CUDA torch already in the system Python (a GPU machine, maybe without network) the venv sees the system
# packages and nothing is downloaded; otherwise it installs the CPU build torch==2.13.0 and triton==3.8.0.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if "$python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "[setup] using the system's CUDA torch ($("$python" -c 'import torch; print(torch.__version__)'))"
  [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
else
  echo "[setup] CPU machine: torch==2.13.0 (CPU build) and triton==3.8.0"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 triton==3.8.0 \
    setuptools wheel ninja pybind11 pytest pytest-benchmark pytest-xdist hypothesis matplotlib tqdm numpy \
    expecttest scikit-learn
fi
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
touch "$venv/.installed"
