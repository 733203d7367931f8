#!/usr/bin/env bash
# Builds dlkernels._C for real on a machine without a GPU: a CUDA build of torch (2.14.1, C++20 headers) in its own
# venv ($1, default /tmp/venv-cuda; about 5.5 GB), a clean clone of HEAD, DLKERNELS_FORCE_CUDA_BUILD=1, then imports
# the extension. Catches what tests/test_build.py cannot: torch's real compile flags, C++20, linking.
set -euo pipefail
venv=${1:-/tmp/venv-cuda}
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check torch==2.14.1 ninja pybind11 setuptools wheel numpy
work=$(mktemp -d)
git clone -q "$repo" "$work/dlkernels"
cd "$work/dlkernels"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} DLKERNELS_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$venv/bin/python" setup.py build_ext --inplace
"$venv/bin/python" -c "import dlkernels._C as C; print('dlkernels._C exports', [n for n in dir(C) if not n.startswith('_')])"
