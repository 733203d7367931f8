"""Drop-in replacements for ``torch.optim`` optimizers, built on ``dlkernels.ops``."""
from .adam import Adam, AdamW
from .sgd import SGD
from .swats import SWATS

__all__ = ["Adam", "AdamW", "SGD", "SWATS"]
