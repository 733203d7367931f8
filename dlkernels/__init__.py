"""dlkernels: fused Triton and CUDA C++ kernels for classic deep-learning building blocks.

``dlkernels.ops`` holds the autograd-aware custom ops, ``dlkernels.nn`` and ``dlkernels.optim`` the drop-in
replacements for ``torch.nn`` modules and ``torch.optim`` optimizers.
"""
from ._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend,
    get_backend,
    set_backend,
)
from . import ops, nn, optim  # noqa: E402  (ops register with torch.library on import)
from . import models  # noqa: E402
from ._backend import check_cuda_extension as _check_cuda_extension
from ._convert import convert  # noqa: E402

_check_cuda_extension()  # an installed _C that fails to load or was built against another torch: say so now

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend",
    "get_backend",
    "set_backend",
    "convert",
    "models",
    "ops",
    "nn",
    "optim",
]
