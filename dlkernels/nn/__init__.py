"""Drop-in replacements for ``torch.nn`` modules, built on ``dlkernels.ops``."""
from .attention import MultiheadAttention, TransformerEncoderLayer
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "MultiheadAttention", "TransformerEncoderLayer"]
from .sync_batch_norm import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]
