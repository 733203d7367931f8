"""Backend selection shared by every op.

Three implementations per op: ``reference`` (eager PyTorch: the test oracle and the CPU fallback), ``triton`` and,
where written, ``cuda`` (the ``dlkernels._C`` extension). ``auto`` sends CUDA tensors to the fastest available kernel
and CPU tensors to the reference path, unless Triton's interpreter is on (``TRITON_INTERPRET=1``), in which case the
Triton kernels run on CPU tensors.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")

_override: str | None = None


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for explicitly but cannot run."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"dlkernels backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend: ``set_backend``/``backend()`` if set, else ``$DLKERNELS_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("DLKERNELS_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Sets the backend for every op: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``."""
    global _override
    name = _check_name(name)
    if name != "auto":
        _require_available(name)
    _override = name


@contextlib.contextmanager
def backend(name: str):
    """``with dlkernels.backend("triton"): ...`` — the backend inside the block, restored after."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_extension():
    """The compiled ``dlkernels._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("dlkernels._C")
    except ImportError:
        return None


def triton_available() -> bool:
    return triton_importable() and (torch.cuda.is_available() or interpreter_active())


def cuda_available() -> bool:
    return cuda_extension() is not None and torch.cuda.is_available()


def available_backends() -> dict[str, bool]:
    return {"reference": True, "triton": triton_available(), "cuda": cuda_available()}


def _require_available(name: str) -> None:
    if name == "triton" and not triton_available():
        why = "triton is not installed" if not triton_importable() else "no CUDA device and TRITON_INTERPRET is not 1"
        raise BackendUnavailableError(f"dlkernels backend 'triton' is not available: {why}")
    if name == "cuda" and not cuda_available():
        why = "dlkernels._C was not built" if cuda_extension() is None else "no CUDA device"
        raise BackendUnavailableError(f"dlkernels backend 'cuda' is not available: {why}")


_warned: set[tuple[str, str]] = set()


def warn_fallback(op: str, reason: str) -> None:
    """Warns once per (op, reason) that a valid configuration runs on the reference path."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"dlkernels.{op}: {reason}; using the reference implementation", stacklevel=3)


def choose(op: str, device: torch.device, *, has_cuda: bool = False, unsupported: str | None = None) -> str:
    """Picks the implementation for one call of ``op`` on ``device``.

    ``has_cuda``: the op has a CUDA C++ kernel. ``unsupported``: why the kernels cannot serve this call (a valid
    configuration they do not cover), or None. Returns ``"reference"``, ``"triton"`` or ``"cuda"``.
    """
    requested = get_backend()
    if requested == "reference":
        return "reference"
    kernel_device = device.type == "cuda" or (device.type == "cpu" and interpreter_active())
    if requested == "auto":
        if not kernel_device:
            return "reference"
        if unsupported is not None:
            warn_fallback(op, unsupported)
            return "reference"
        if device.type == "cuda" and has_cuda and cuda_available():
            return "cuda"
        if triton_available():
            return "triton"
        warn_fallback(op, "triton is not installed")
        return "reference"
    # An explicit kernel backend.
    _require_available(requested)
    if requested == "cuda" and not has_cuda:
        raise BackendUnavailableError(f"dlkernels.{op} has no CUDA C++ kernel; use backend 'triton' or 'auto'")
    if requested == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"dlkernels backend 'cuda' needs CUDA tensors, got {device.type} tensors")
    if not kernel_device:
        raise BackendUnavailableError(
            f"dlkernels backend 'triton' cannot run on {device.type} tensors (set TRITON_INTERPRET=1 for CPU)"
        )
    if unsupported is not None:
        warn_fallback(op, unsupported)
        return "reference"
    return requested
