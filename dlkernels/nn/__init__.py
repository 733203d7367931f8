"""Drop-in replacements for ``torch.nn`` modules, built on ``dlkernels.ops``."""
from .attention import MultiheadAttention, TransformerEncoderLayer
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .conv import Conv2d, ConvBlock2d
from .lstm import LSTM, LSTMCell
from .sync_batch_norm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv2d", "ConvBlock2d", "LSTM", "LSTMCell",
           "MultiheadAttention", "SyncBatchNorm", "TransformerEncoderLayer"]
