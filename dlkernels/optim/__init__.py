"""Drop-in replacements for ``torch.optim`` optimizers, built on ``dlkernels.ops``; ``from_torch`` converts one."""
from .adam import Adam, AdamW
from .convert import from_torch
from .sgd import SGD
from .swats import SWATS

__all__ = ["Adam", "AdamW", "SGD", "SWATS", "from_torch"]
