"""Batch norm in training with the statistics of every rank of a ``torch.distributed`` process group.

One collective per direction, on any backend (gloo on CPU, NCCL on CUDA):

- forward: each rank writes (count, mean, centered sum of squares) of its own batch into its row of a
  [world, 3, C] tensor of zeros and the ranks ``all_reduce`` (sum) it, so every rank holds every rank's
  statistics; each then combines them with Chan et al.'s parallel rule (``M2 = sum M2_r + sum n_r (mean_r -
  mean)^2``). Exact for unequal batch sizes and free of the cancellation of ``E[x^2] - E[x]^2``; a rank with an
  empty batch contributes count 0 and still takes part, so no rank waits forever.
- backward: one ``all_reduce`` of the per-channel (sum of dy, sum of dy * xhat) over all ranks.

The normalization itself (and the fused ReLU) is ``dlkernels.ops.batch_norm`` in its evaluation form, given the
combined mean and variance, so it runs the batch-norm kernel where that runs. The statistics (one fp32 reduction
of x per rank) and the backward's elementwise formula are eager PyTorch. Gradients of ``weight`` and ``bias`` are
this rank's own (as ``torch.nn.SyncBatchNorm``'s): ``DistributedDataParallel`` sums them across ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .batch_norm import batch_norm


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def gather_statistics(x: Tensor, group, world_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased variance) per channel of the batch made of every rank's ``x``, with one all_reduce."""
    acc = _acc_dtype(x)
    c = x.shape[1]
    local = x.new_zeros((world_size, 3, c), dtype=acc)
    rank = dist.get_rank(group)
    n = x.numel() // c
    if n > 0:
        var, mean = torch.var_mean(x.to(acc), _dims(x), correction=0)
        local[rank, 0] = n
        local[rank, 1] = mean
        local[rank, 2] = var * n
    dist.all_reduce(local, group=group)
    counts, means, m2s = local.unbind(1)  # each [world, C]
    total = counts[:, :1].sum()
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2 / total.clamp(min=1)


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu, group, world_size):
        total, mean, var = gather_statistics(x, group, world_size)
        count = int(total)  # every rank holds the same count, so every rank raises alike (none is left waiting)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} over all ranks")
        if running_mean is not None:
            running_mean.copy_((1 - momentum) * running_mean.to(mean.dtype) + momentum * mean)
            running_var.copy_((1 - momentum) * running_var.to(var.dtype) + momentum * var * (count / (count - 1)))
        ctx.save_for_backward(x, weight, bias, mean, torch.rsqrt(var + eps))
        ctx.count, ctx.relu, ctx.group = count, relu, group
        if x.numel() == 0:
            return torch.empty_like(x)
        # Normalizing with given statistics is batch norm's evaluation form: the kernel (+ fused ReLU) does it.
        # The combined statistics are in the accumulation dtype: the affine parameters join them there (batch norm
        # takes fp32 statistics and parameters with fp16/bf16 input, not a mix of parameter dtypes).
        weight, bias = (t.to(mean.dtype) if t is not None else None for t in (weight, bias))
        return batch_norm(x, mean, var, weight, bias, False, 0.0, eps, activation="relu" if relu else None)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        acc, shape, dims = mean.dtype, _shape(x), _dims(x)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        g = grad_out.to(acc)
        if ctx.relu:
            y = xhat * weight.to(acc).view(shape) if weight is not None else xhat
            y = y + bias.to(acc).view(shape) if bias is not None else y
            g = torch.where(y > 0, g, 0.0)
        sums = torch.stack([g.sum(dims), (g * xhat).sum(dims)])  # this rank's d(bias), d(weight)
        local_gb, local_gw = sums.clone().unbind(0)
        dist.all_reduce(sums, group=ctx.group)
        sum_g, sum_gx = sums.unbind(0)
        scale = invstd if weight is None else invstd * weight.to(acc)
        dx = scale.view(shape) * (g - (sum_g / ctx.count).view(shape) - xhat * (sum_gx / ctx.count).view(shape))
        dx = dx.to(x.dtype)
        gw = local_gw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = local_gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    process_group=None,
) -> Tensor:
    """Training-mode batch norm over the union of ``input`` on every rank of ``process_group`` (default: the world).

    Must be called by every rank of the group (with the same channel count; batch sizes may differ, and may be 0).
    Updates ``running_mean``/``running_var`` (unbiased variance) with the combined statistics, identically on every
    rank. ``activation="relu"`` fuses a ReLU. See the module docstring for the communication.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.shape[1] == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_batch_norm needs an initialized torch.distributed process group")
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    weight, bias = (t.view(-1) if t is not None else None for t in (weight, bias))
    return SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, float(momentum), float(eps), activation == "relu", group,
        world_size,
    )
