"""Test setup. Two kinds of run:

- ``pytest -m gpu`` on a machine with CUDA: the GPU tests, on the real compiled kernels.
- anything else: Triton's interpreter runs every Triton kernel on CPU tensors (``TRITON_INTERPRET=1``, set here
  before triton is first imported) and the GPU tests are skipped.
"""
import os

import pytest
import torch

GPU_RUN = False


def pytest_configure(config):
    global GPU_RUN
    GPU_RUN = torch.cuda.is_available() and config.getoption("markexpr") == "gpu"
    if not GPU_RUN:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if GPU_RUN:
        return
    reason = "GPU tests run with `pytest -m gpu` on a CUDA machine" if torch.cuda.is_available() else "needs CUDA"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if GPU_RUN else "cpu"


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test starts from the default backend choice (``$DLKERNELS_BACKEND`` or auto), with no fallback warned
    yet, and leaves the backend so."""
    from dlkernels import _backend

    _backend._override = None
    _backend._warned.clear()
    yield
    _backend._override = None
