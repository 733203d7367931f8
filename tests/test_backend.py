"""Backend selection: overrides, errors for unavailable backends, one warning per fallback reason, the CLI."""
import importlib
import importlib.util
import os
import subprocess
import sys
import types
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


def test_triton_interpret_set_after_triton_was_imported():
    """The interpreter cannot work then: an explicit 'triton' backend says why, 'auto' runs the reference path and
    warns once, at the caller's line."""
    code = """
import os, warnings
import triton, torch, dlkernels
os.environ["TRITON_INTERPRET"] = "1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dlkernels.ops.batch_norm(torch.randn(4, 3, 5), None, None, training=True)  # the caller's line
    dlkernels.ops.batch_norm(torch.randn(4, 3, 5), None, None, training=True)
print("WARNINGS", [(str(w.message), w.filename) for w in caught])
try:
    dlkernels.set_backend("triton")
except dlkernels.BackendUnavailableError as e:
    print("ERROR", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert "TRITON_INTERPRET=1 was set after triton was imported" in error and "before" in error
    warned = next(line for line in out.splitlines() if line.startswith("WARNINGS"))
    assert warned.count("after triton was imported") == 1 and "'<string>'" in warned


def test_fallback_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="reason C") as caught:
        _backend.choose("op_y", torch.device("cpu"), unsupported="reason C")
    assert caught[0].filename == __file__


def test_fallback_warning_through_torch_frames_points_at_the_callers_line():
    """Double backward of batch norm falls back inside autograd (torch frames): the warning names this file."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    with dlkernels.backend("triton"):
        y = dlkernels.ops.batch_norm(x, None, None, training=True)
        with pytest.warns(UserWarning, match="double backward") as caught:
            torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert {w.filename for w in caught} == {__file__}


@pytest.fixture
def fake_extension(monkeypatch):
    """Makes ``dlkernels._C`` look installed, loading as ``load()`` says; restores the real state after."""
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module

    def install(load):
        def find_spec(name, *args):
            return object() if name == "dlkernels._C" else real_find_spec(name, *args)

        def import_module(name, *args):
            return load() if name == "dlkernels._C" else real_import(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(importlib, "import_module", import_module)
        _backend._load_cuda_extension.cache_clear()

    yield install
    monkeypatch.undo()
    _backend._load_cuda_extension.cache_clear()


def test_extension_that_fails_to_import_reports_the_real_cause(fake_extension):
    def load():
        raise ImportError("dlkernels/_C.so: undefined symbol: _ZN3c106detail14torchCheckFail")

    fake_extension(load)
    assert "undefined symbol: _ZN3c106detail14torchCheckFail" in _backend.cuda_extension_error()
    assert "not built" not in _backend.cuda_extension_error()
    with pytest.warns(UserWarning, match="failed to import .*undefined symbol.*using the Triton kernels") as caught:
        assert _backend.cuda_extension() is None
    assert caught[0].filename == __file__


def test_extension_built_against_another_torch_is_not_used(fake_extension):
    fake_extension(lambda: types.SimpleNamespace(torch_version="1.13.0+cu117"))
    why = _backend.cuda_extension_error()
    assert "built against torch 1.13.0+cu117" in why and torch.__version__ in why and "--no-build-isolation" in why
    with pytest.warns(UserWarning, match="1.13.0"):
        assert _backend.cuda_extension() is None


def test_extension_built_against_this_torch_is_used(fake_extension):
    module = types.SimpleNamespace(torch_version=torch.__version__)
    fake_extension(lambda: module)
    assert _backend.cuda_extension() is module and _backend.cuda_extension_error() is None
