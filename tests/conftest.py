"""Test setup: without a GPU, Triton's interpreter runs every Triton kernel on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, before dlkernels is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test starts from the default backend choice (``$DLKERNELS_BACKEND`` or auto) and leaves it so."""
    from dlkernels import _backend

    _backend._override = None
    yield
    _backend._override = None
