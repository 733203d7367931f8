"""Drop-in replacements for ``torch.nn`` modules, built on ``dlkernels.ops``."""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__: list[str] = []
from .attention import MultiheadAttention, TransformerEncoderLayer  # noqa: E402
