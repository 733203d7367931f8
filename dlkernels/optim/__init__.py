"""Drop-in replacements for ``torch.optim`` optimizers, built on ``dlkernels.ops``."""
from .adam import Adam, AdamW
from .sgd import SGD
from .swats import SWATS

__all__ = ["Adam", "AdamW", "SGD", "SWATS"]
from .convert import from_torch  # noqa: E402

__all__ += ["from_torch"]
