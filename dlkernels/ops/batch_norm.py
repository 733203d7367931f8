"""Batch normalization (with optional fused ReLU) as ``torch.library`` custom ops.

``dlkernels::batch_norm_forward`` mutates the running statistics (updated inside the kernel), so it cannot carry a
``register_autograd`` formula; autograd is an ``autograd.Function`` over it and the functional
``dlkernels::batch_norm_backward``. Both ops have fake implementations, so ``torch.compile(fullgraph=True)`` sees
them as opaque nodes. The backend is chosen inside the ops, at run time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend

_REDUCED = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 (fp64 for fp64 input) whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_minor(x: Tensor) -> bool | None:
    """True: channels are the contiguous dim (channels_last, (N, C)); False: dense NC...; None: neither."""
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    if x.is_contiguous():
        return x.dim() == 2 or spatial == 1
    if x.movedim(1, -1).is_contiguous():
        return True
    return None


def _like_layout(t: Tensor, channel_minor: bool) -> Tensor:
    """``t`` in the layout the kernels read for ``channel_minor`` (a copy only when it is not already)."""
    if channel_minor:
        return t if t.movedim(1, -1).is_contiguous() else t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _broadcast_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation: the CPU fallback and the same math the kernels do, in eager PyTorch.


def reference_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    acc = _stats_dtype(x.dtype)
    dims = [0, *range(2, x.dim())]
    shape = _broadcast_shape(x)
    xf = x.to(acc)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            running_mean.copy_((1 - momentum) * running_mean.to(acc) + momentum * mean)
            running_var.copy_((1 - momentum) * running_var.to(acc) + momentum * var * (count / (count - 1)))
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    y = (xf - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype), torch.stack([torch.zeros_like(mean), mean, invstd])


def reference_backward(grad_out, x, weight, bias, stats, training, relu):
    acc = stats.dtype
    mean, invstd = stats[0] + stats[1], stats[2]
    dims = [0, *range(2, x.dim())]
    shape = _broadcast_shape(x)
    xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
    g = grad_out.to(acc)
    if relu:
        y = xhat * (weight.to(acc).view(shape) if weight is not None else 1.0)
        y = y + (bias.to(acc).view(shape) if bias is not None else 0.0)
        g = torch.where(y > 0, g, 0.0)
    sum_g = g.sum(dims)
    sum_gx = (g * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if training:
        count = x.numel() // x.shape[1]
        dx = scale.view(shape) * (g - (sum_g / count).view(shape) - xhat * (sum_gx / count).view(shape))
    else:
        dx = scale.view(shape) * g
    return dx.to(x.dtype), sum_gx, sum_g


# ---------------------------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("dlkernels::batch_norm_forward", mutates_args=("running_mean", "running_var"))
def batch_norm_forward(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out, stats): stats is [3, C] (center, mean, invstd), fp32 (fp64 for fp64 input), describing the
    statistics used (batch or running): the mean is center + mean (see dlkernels.kernels.batch_norm)."""
    if x.numel() == 0:  # as torch: an empty output, running statistics left alone
        return torch.empty_like(x), x.new_zeros((3, x.shape[1]), dtype=_stats_dtype(x.dtype))
    impl = _backend.choose("batch_norm", x.device)
    if impl == "reference":
        return reference_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    from ..kernels import batch_norm as kernels

    channel_minor = _channel_minor(x)
    if channel_minor is None:  # neither dense layout: the kernels read a dense copy
        x, channel_minor = x.contiguous(), _channel_minor(x.contiguous())
    return kernels.batch_norm_forward(
        x, running_mean, running_var, weight, bias, training, momentum, eps, relu, channel_minor
    )


@batch_norm_forward.register_fake
def _(x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=_stats_dtype(x.dtype))


@torch.library.custom_op("dlkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stats: Tensor,
    training: bool,
    relu: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); a gradient not asked for in ``output_mask`` is an empty tensor."""
    impl = _backend.choose("batch_norm", x.device)
    if x.numel() == 0:
        dx, gw, gb = torch.zeros_like(x), stats[0].new_zeros(x.shape[1]), stats[0].new_zeros(x.shape[1])
    elif impl == "reference":
        dx, gw, gb = reference_backward(grad_out, x, weight, bias, stats, training, relu)
    else:
        from ..kernels import batch_norm as kernels

        channel_minor = _channel_minor(x)
        if channel_minor is None:
            x, channel_minor = x.contiguous(), _channel_minor(x.contiguous())
        dx, gw, gb = kernels.batch_norm_backward(
            _like_layout(grad_out, channel_minor), x, weight, bias, stats, training, relu, channel_minor,
            *output_mask,
        )
    return (
        dx if output_mask[0] else x.new_empty(0),
        gw.to(weight.dtype) if output_mask[1] else x.new_empty(0),
        gb.to(bias.dtype) if output_mask[2] else x.new_empty(0),
    )


@batch_norm_backward.register_fake
def _(grad_out, x, weight, bias, stats, training, relu, output_mask):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(weight) if output_mask[1] else x.new_empty(0),
        torch.empty_like(bias) if output_mask[2] else x.new_empty(0),
    )


def _differentiable_backward(ctx, grad_out, x, weight, bias, stats):
    """Double backward: recompute the forward with the eager reference, which autograd differentiates again."""
    _backend.warn_fallback("batch_norm", "double backward (create_graph=True) is differentiated through the reference")
    acc = stats.dtype
    shape = _broadcast_shape(x)
    dims = [0, *range(2, x.dim())]
    xf = x.to(acc)
    if ctx.training:
        var, mean = torch.var_mean(xf, dims, correction=0)
        invstd = torch.rsqrt(var + ctx.eps)
    else:  # running statistics are constants
        mean, invstd = stats[0] + stats[1], stats[2]
    y = (xf - mean.view(shape)) * invstd.view(shape)
    y = y * weight.to(acc).view(shape) if weight is not None else y
    y = y + bias.to(acc).view(shape) if bias is not None else y
    y = torch.relu(y) if ctx.relu else y
    wanted = [(i, t) for i, t in ((0, x), (3, weight), (4, bias)) if ctx.needs_input_grad[i]]
    grads = torch.autograd.grad(y.to(x.dtype), [t for _, t in wanted], grad_out, create_graph=True)
    result = [None] * 9
    for (i, _), g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
        out, stats = batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, relu)
        # ReLU's mask is recomputed from x and the statistics: neither the output nor a mask is saved.
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.training, ctx.relu, ctx.eps = training, relu, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernels' backward has no derivative of its own
            return _differentiable_backward(ctx, grad_out, x, weight, bias, stats)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        dx, gw, gb = batch_norm_backward(grad_out, x, weight, bias, stats, ctx.training, ctx.relu, mask)
        return (dx if mask[0] else None), None, None, (gw if mask[1] else None), (gb if mask[2] else None), \
            None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public function.


def _check_param(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.numel() != x.shape[1]:
        raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {t.numel()} (shape {tuple(t.shape)})")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")
    allowed = (x.dtype, torch.float32) if x.dtype in _REDUCED else (x.dtype,)
    if t.dtype not in allowed:
        raise RuntimeError(
            f"mixed dtype: {name} has dtype {t.dtype} but input has dtype {x.dtype} "
            f"(expected {' or '.join(str(d) for d in allowed)})"
        )


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` with the same semantics, plus ``activation="relu"`` fused.

    Input (N, C, *) of any layout (dense NCHW and channels_last run without copies), fp16/bf16/fp32 (fp64 too) with
    fp32 statistics. Training normalizes with the batch statistics and, when given, updates ``running_mean`` and
    ``running_var`` (unbiased) in place with ``momentum``; eval uses the running statistics.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (N, C, *), got {input.dim()}D input")
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f"batch_norm: input dtype {input.dtype} is not supported (a floating dtype is)")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if momentum is None or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {momentum!r} (the modules handle momentum=None)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_param(name, t, input)
    if training and input.numel() > 0 and input.numel() // input.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    weight, bias = (t.view(-1) if t is not None else None for t in (weight, bias))  # (1, C) works as in torch
    return _BatchNormFunction.apply(
        input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps),
        activation == "relu",
    )
