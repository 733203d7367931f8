"""Drop-in ``torch.nn.SyncBatchNorm`` on ``dlkernels.ops``: runs on any process group backend (gloo on CPU too,
which torch's own refuses), one ``all_reduce`` per forward and one per backward, optional fused ReLU."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import ops
from ..ops.sync_batch_norm import sync_batch_norm

# torch >= 2.12 lets batch norm drop its bias alone (``bias=False``); older versions have no such argument.
_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.modules.batchnorm._BatchNorm.__init__).parameters


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` (same arguments, parameters, buffers, ``state_dict``, ``process_group``,
    ``convert_sync_batchnorm``), plus ``activation="relu"``.

    In training under an initialized ``torch.distributed`` group of more than one rank, the batch statistics are
    those of the union of every rank's batch (see ``dlkernels.ops.sync_batch_norm``: exact for unequal and empty
    batches); otherwise it is ``dlkernels.nn.BatchNorm*d``. Every rank of the group must call it in training, as
    with torch's module.

    It is deliberately not a subclass of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses any
    ``torch.nn.SyncBatchNorm`` on CPU ("SyncBatchNorm layers only work with GPU modules"), and this one runs on
    gloo there. It shares torch's base class (``_BatchNorm``) and methods.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        **kwargs,
    ) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group
        self.activation = activation

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        group = self.process_group if self.process_group is not None else None
        if (
            batch_stats and self.training and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group if group is not None else dist.group.WORLD) > 1
        ):
            return sync_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                activation=self.activation, process_group=group,
            )
        return ops.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, batch_stats, momentum, self.eps,
            activation=self.activation,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replaces every ``BatchNorm*d`` (torch's, ``SyncBatchNorm`` or dlkernels') in ``module`` by this class,
        sharing the very same parameter and buffer tensors and keeping a fused ``activation``. As torch's: returns
        ``module`` with its children converted, or a new module when ``module`` itself is a batch norm."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            kwargs = {"bias": module.bias is not None} if _HAS_BIAS_ARG and module.affine else {}
            output = cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                process_group, device="meta", activation=getattr(module, "activation", None), **kwargs,
            )
            for name in ("weight", "bias"):
                setattr(output, name, getattr(module, name))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(output, name, getattr(module, name))
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output
