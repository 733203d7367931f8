"""Drop-in ``torch.nn.BatchNorm1d/2d/3d`` on ``dlkernels.ops.batch_norm``, with an optional fused ReLU.

They subclass torch's modules and take every argument torch's take (``bias=False`` too; ``momentum`` a float, a
0-d tensor or None), so ``isinstance``, parameters, buffers, ``state_dict`` (both ways) and ``num_batches_tracked``
(including ``momentum=None``, the cumulative average) behave exactly as in torch. Only ``activation`` is added.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops.batch_norm import check_arguments


class _FusedBatchNorm:
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
    ) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # As torch: normalize with batch statistics in training, or when there are no running statistics; pass the
        # running statistics only when they are used (eval) or updated (training and tracked).
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        momentum = 0.0 if self.momentum is None else self.momentum
        # Every argument is checked before the batch is counted, so a refused call changes nothing.
        check_arguments(input, running_mean, running_var, self.weight, self.bias, batch_stats, momentum, self.eps,
                        self.activation)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return ops.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, batch_stats, momentum, self.eps,
            activation=self.activation,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class BatchNorm1d(_FusedBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on (N, C) or (N, C, L), with ``activation=None|"relu"``."""


class BatchNorm2d(_FusedBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on (N, C, H, W), NCHW or channels_last, with ``activation=None|"relu"``."""


class BatchNorm3d(_FusedBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on (N, C, D, H, W), NCDHW or channels_last_3d, with ``activation=None|"relu"``."""
