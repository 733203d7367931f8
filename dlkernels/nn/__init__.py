"""Drop-in replacements for ``torch.nn`` modules, built on ``dlkernels.ops``."""

__all__: list[str] = []
