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
import sys
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


LATE_INTERPRETER = (
    "TRITON_INTERPRET=1 was set after triton was imported, so Triton's own functions were compiled for the GPU and "
    "its interpreter cannot run; set it before anything imports triton (`TRITON_INTERPRET=1 python ...`, or "
    "os.environ at the very top of the script)"
)


def _triton_imported_for_interpreter() -> bool | None:
    """Whether the imported triton decorated its own ``@triton.jit`` functions for the interpreter (decided when
    triton was first imported); None if triton is not imported yet."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    kinds = {type(v).__name__ for v in vars(standard).values()}
    if "InterpretedFunction" in kinds:
        return True
    return False if "JITFunction" in kinds else None


def late_interpreter() -> bool:
    """``TRITON_INTERPRET=1`` is set now, but triton was imported without it: the interpreter cannot work."""
    return os.environ.get("TRITON_INTERPRET") == "1" and _triton_imported_for_interpreter() is False


def interpreter_active() -> bool:
    """Triton's interpreter runs the kernels (on CPU tensors). ``TRITON_INTERPRET=1`` set after triton was imported
    does not count (it cannot work): CPU tensors then take the reference path, with a warning saying why."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if late_interpreter():
        _warn_once(("interpreter", "late"), f"dlkernels: {LATE_INTERPRETER}; CPU tensors use the reference kernels")
        return False
    return True


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _load_cuda_extension():
    """(the ``dlkernels._C`` module or None, why it cannot be used)."""
    try:
        present = importlib.util.find_spec("dlkernels._C") is not None
    except (ImportError, ValueError):
        present = False
    if not present:
        return None, "dlkernels._C was not built"
    try:
        module = importlib.import_module("dlkernels._C")
    except Exception as exc:  # the real cause (undefined symbol after a torch upgrade, missing libcudart, ...)
        return None, (f"dlkernels._C is installed but failed to import ({type(exc).__name__}: {exc}); rebuild it "
                      f"against this torch ({torch.__version__}) with `pip install --no-build-isolation .`")
    built = getattr(module, "torch_version", None)
    if built is not None and built != torch.__version__:
        return None, (f"dlkernels._C was built against torch {built} but torch {torch.__version__} is running; "
                      f"rebuild it with `pip install --no-build-isolation .`")
    return module, None


def cuda_extension_error() -> str | None:
    """Why ``dlkernels._C`` cannot be used (not built, failed to import, built against another torch), or None."""
    return _load_cuda_extension()[1]


def cuda_extension():
    """The compiled ``dlkernels._C`` module, or None. When it is installed but unusable (import error, other torch)
    this warns once with the cause; ops then use their Triton kernels."""
    module, why = _load_cuda_extension()
    if module is None and why != "dlkernels._C was not built":
        _warn_once(("_C", why), f"{why}; using the Triton kernels instead")
    return module


def triton_available() -> bool:
    return triton_importable() and (torch.cuda.is_available() or interpreter_active())


def cuda_available() -> bool:
    return torch.cuda.is_available() and cuda_extension() is not None


def available_backends() -> dict[str, bool]:
    return {"reference": True, "triton": triton_available(), "cuda": cuda_available()}


def _require_available(name: str) -> None:
    if name == "triton" and not triton_available():
        if not triton_importable():
            why = "triton is not installed"
        elif late_interpreter():
            why = LATE_INTERPRETER
        else:
            why = "no CUDA device and TRITON_INTERPRET is not 1"
        raise BackendUnavailableError(f"dlkernels backend 'triton' is not available: {why}")
    if name == "cuda" and not cuda_available():
        why = "no CUDA device" if not torch.cuda.is_available() else cuda_extension_error()
        raise BackendUnavailableError(f"dlkernels backend 'cuda' is not available: {why}")


_warned: set = set()
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


def caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called right here that names the first frame outside dlkernels and torch:
    the user's line that called the op, module or optimizer."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=caller_stacklevel())


def warn_fallback(op: str, reason: str) -> None:
    """Warns once per (op, reason) that a valid configuration runs on the reference path; the warning points at the
    caller's line (the first frame outside dlkernels and torch)."""
    _warn_once((op, reason), f"dlkernels.{op}: {reason}; using the reference implementation")


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
