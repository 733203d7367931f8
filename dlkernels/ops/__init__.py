"""Autograd-aware custom ops (``torch.library`` namespace ``dlkernels``), each with a reference implementation."""
from .batch_norm import batch_norm

__all__: list[str] = []

from .attention import attention  # noqa: E402
__all__ += ["attention"]
from .optim import adam_step, sgd_step, swats_step  # noqa: E402,F401
