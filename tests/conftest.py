"""Test setup. Two kinds of run:

- ``pytest -m gpu`` on a machine with CUDA: the GPU tests, on the real compiled kernels.
- anything else: Triton's interpreter runs every Triton kernel on CPU tensors (``TRITON_INTERPRET=1``, set here
  before triton is first imported) and the GPU tests are skipped.

Property-based tests (hypothesis) are marked ``fuzz`` and run in every run with the ``ci`` profile (a small, fixed,
derandomized example budget that keeps ``make test`` short); ``pytest -m fuzz tests`` runs only them with the
``fuzz`` profile (many more, random examples). ``DLKERNELS_FUZZ_EXAMPLES=N`` overrides either budget.
"""
import importlib.machinery
import os
import sys
import types
import unittest
from unittest import mock

import pytest
import torch


def _stand_ins_for_missing_test_packages() -> None:
    """A lent GPU machine has pytest but no network, so no hypothesis and no expecttest, and ``pytest -m gpu`` still
    collects every test file. There, property tests become skipped tests and torch's test utilities (module_db,
    optim_db) get the one class they take from expecttest; everywhere else (CPU, CI) the real packages are used."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("expecttest", None)  # torch._dynamo looks modules up
        stand_in.TestCase = type("TestCase", (unittest.TestCase,), {})
        sys.modules["expecttest"] = stand_in
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="hypothesis is not installed (property tests)")

        class settings:  # noqa: N801  (hypothesis' name)
            max_examples = 1

            def __init__(self, *args, **kwargs):
                pass

            def __call__(self, test):
                return test

            register_profile = load_profile = staticmethod(lambda *args, **kwargs: None)

        stand_in = types.ModuleType("hypothesis")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("hypothesis", None)
        stand_in.given = lambda *args, **kwargs: skip
        stand_in.settings = settings
        stand_in.strategies = mock.MagicMock()  # strategies are built at import time, never drawn from
        stand_in.__getattr__ = lambda name: mock.MagicMock(name=f"hypothesis.{name}")  # HealthCheck, Verbosity...
        sys.modules.update({"hypothesis": stand_in, "hypothesis.strategies": stand_in.strategies})


_stand_ins_for_missing_test_packages()

GPU_RUN = False


def _hypothesis_profiles(markexpr: str) -> None:
    from hypothesis import HealthCheck, settings
    # torch's test utilities (module_db, optim_db) load their own hypothesis profile when first imported, process-wide,
    # and @given captures the profile at decoration: import them first, so ours is the one loaded afterwards.
    import torch.testing._internal.common_utils  # noqa: F401

    budget = os.environ.get("DLKERNELS_FUZZ_EXAMPLES")
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                  print_blob=True)
    settings.register_profile("ci", max_examples=int(budget or 12), derandomize=True, **common)
    settings.register_profile("fuzz", max_examples=int(budget or 300), **common)
    settings.load_profile("fuzz" if markexpr == "fuzz" else "ci")


def pytest_configure(config):
    global GPU_RUN
    markexpr = config.getoption("markexpr")
    GPU_RUN = torch.cuda.is_available() and markexpr == "gpu"
    if not GPU_RUN:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _hypothesis_profiles(markexpr)


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
