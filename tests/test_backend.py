"""Backend selection: overrides, errors for unavailable backends, one warning per fallback reason, the CLI."""
import subprocess
import sys
import warnings

import pytest
import torch

import dlkernels
from dlkernels import _backend


def test_auto_runs_triton_on_cpu_under_the_interpreter():
    assert _backend.interpreter_active()
    assert _backend.choose("op", torch.device("cpu")) == "triton"


def test_set_backend_and_context_manager():
    dlkernels.set_backend("reference")
    assert dlkernels.get_backend() == "reference"
    with dlkernels.backend("triton"):
        assert dlkernels.get_backend() == "triton"
        assert _backend.choose("op", torch.device("cpu")) == "triton"
    assert dlkernels.get_backend() == "reference"
    assert _backend.choose("op", torch.device("cpu")) == "reference"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("DLKERNELS_BACKEND", "reference")
    assert dlkernels.get_backend() == "reference"
    monkeypatch.setenv("DLKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        dlkernels.get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="one of"):
        dlkernels.set_backend("cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend may be available")
def test_unavailable_backend_raises():
    with pytest.raises(dlkernels.BackendUnavailableError, match="cuda"):
        dlkernels.set_backend("cuda")


def test_explicit_cuda_backend_for_an_op_without_cuda_kernel(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_available", lambda: True)
    dlkernels.set_backend("cuda")
    with pytest.raises(dlkernels.BackendUnavailableError, match="no CUDA C"):
        _backend.choose("batch_norm", torch.device("cpu"), has_cuda=False)


def test_fallback_warns_once_per_reason():
    with pytest.warns(UserWarning, match="reason A; using the reference"):
        assert _backend.choose("op_x", torch.device("cpu"), unsupported="reason A") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose("op_x", torch.device("cpu"), unsupported="reason A") == "reference"
    with pytest.warns(UserWarning, match="reason B"):
        _backend.choose("op_x", torch.device("cpu"), unsupported="reason B")


def test_reference_and_triton_agree_through_the_public_op():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with dlkernels.backend("reference"):
        y_ref = dlkernels.ops.batch_norm(x, rm.clone(), rv.clone(), training=True)
    with dlkernels.backend("triton"):
        y_tri = dlkernels.ops.batch_norm(x, rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(y_ref, y_tri)


def test_info_command_reports_backends():
    out = subprocess.run([sys.executable, "-m", "dlkernels", "info"], capture_output=True, text=True, check=True)
    assert "reference  available" in out.stdout and "triton" in out.stdout and "cuda" in out.stdout


def test_import_without_the_extension():
    """``import dlkernels`` works with ``_C`` absent, and the cuda backend then says why it is unavailable."""
    code = "import sys; sys.modules['dlkernels._C'] = None; import dlkernels; print(dlkernels.available_backends())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'cuda': False" in out.stdout
