"""Drop-in replacements for ``torch.nn`` modules, built on ``dlkernels.ops``."""
from .attention import MultiheadAttention, TransformerEncoderLayer
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .lstm import LSTM, LSTMCell

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "MultiheadAttention", "TransformerEncoderLayer"]
__all__ += ["LSTM", "LSTMCell"]
