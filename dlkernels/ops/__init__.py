"""Autograd-aware custom ops (``torch.library`` namespace ``dlkernels``), each with a reference implementation."""
from .attention import attention
from .batch_norm import batch_norm
from .conv import conv2d
from .lstm import lstm_cell, lstm_layer, lstm_layer_bidirectional
from .optim import adam_step, sgd_step, swats_step

__all__ = ["attention", "batch_norm", "conv2d", "lstm_cell", "lstm_layer", "lstm_layer_bidirectional", "adam_step",
           "sgd_step", "swats_step"]
