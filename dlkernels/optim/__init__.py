"""Drop-in replacements for ``torch.optim`` optimizers, built on ``dlkernels.ops``."""

__all__: list[str] = []
