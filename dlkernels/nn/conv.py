"""Drop-in ``torch.nn.Conv2d`` on ``dlkernels.ops.conv2d``, with optional fused ReLU and pooling, and ``ConvBlock2d``.

Both subclass ``torch.nn.Conv2d``: parameters, ``state_dict`` keys (``weight``, ``bias``), initialization,
``padding_mode`` and every constructor argument behave as torch's, so weights move both ways.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.conv import _pool_args


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d(...)`` plus keyword-only ``activation=None|"relu"`` and ``pool=None|("max"|"avg",
    kernel_size[, stride])``, applied after the convolution in one fused op (see ``dlkernels.ops.conv2d``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        pool=None,
    ) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        _pool_args(pool)  # fail at construction, not at the first call
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self.activation = activation
        self.pool = tuple(pool) if pool is not None else None

    def _conv_forward(self, input, weight, bias):
        options = dict(activation=self.activation, pool=self.pool)
        if self.padding_mode != "zeros":  # as torch: pad explicitly, then convolve without padding
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return ops.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups, **options)
        return ops.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, **options)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra + (f", pool={self.pool!r}" if self.pool else "")


class ConvBlock2d(Conv2d):
    """Conv2d + bias + ReLU (default) + optional pool, the CNN block of LeNet/AlexNet/VGG, as one fused op.

    ``ConvBlock2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, activation="relu",
    pool=None)``; its ``state_dict`` is that of ``torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride,
    padding, bias=bias)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        activation: Optional[str] = "relu",
        pool=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias, device=device,
                         dtype=dtype, activation=activation, pool=pool)
