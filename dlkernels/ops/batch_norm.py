"""Batch normalization (with optional fused ReLU) as ``torch.library`` custom ops.

``dlkernels::batch_norm_forward`` mutates the running statistics (updated inside the kernel), so it cannot carry a
``register_autograd`` formula; autograd is an ``autograd.Function`` over it and the functional
``dlkernels::batch_norm_backward``. Both ops have fake implementations, so ``torch.compile(fullgraph=True)`` sees
them as opaque nodes. The backend is chosen inside the ops, at run time.
"""
from __future__ import annotations

import math
import numbers
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
        # Two passes, as torch's CPU kernel: an inf gives an inf mean and a NaN variance (var_mean's one-pass
        # update would make the mean NaN too).
        mean = xf.mean(dims)
        var = (xf - mean.view(shape)).square().mean(dims)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * (var * (count / (count - 1))) + (1 - momentum) * running_var.to(acc))
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
        g = torch.where(y <= 0, 0.0, g)  # torch.relu's gradient: a NaN output passes it
    sum_g = g.sum(dims)
    sum_gx = (g * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if training:
        count = x.numel() // x.shape[1]
        dx = (g - (sum_g / count).view(shape) - xhat * (sum_gx / count).view(shape)) * scale.view(shape)
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


def _check_same_device(x: Tensor, **tensors) -> None:
    """A fake (meta) run checks what a real one would: every tensor on the input's device."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")


@batch_norm_forward.register_fake
def _(x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    _check_same_device(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
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
    _check_same_device(x, grad_out=grad_out, weight=weight, bias=bias, stats=stats)
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


def _as_float(name: str, value) -> float:
    """A float argument as torch's argument parser takes it: a Python number or a 0-d real tensor."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, Tensor):
        return float(value)
    raise TypeError(f"batch_norm(): argument '{name}' must be float, not {_describe(value)}")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_per_channel(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"batch_norm(): {name} must be a Tensor or None, not {_describe(t)}")
    if t.numel() != x.shape[1]:
        raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {t.numel()} (shape {tuple(t.shape)})")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device} but input is on {x.device}")
    if name.startswith("running") and t.dim() != 1:  # torch's kernels index running statistics as 1-D
        raise RuntimeError(f"{name} must be 1-D with {x.shape[1]} elements, got shape {tuple(t.shape)}")


def _check_param_dtypes(x: Tensor, params: dict) -> None:
    """As torch: the given parameters and statistics share one dtype, the input's or (fp16/bf16 input) float32."""
    given = {name: t.dtype for name, t in params.items() if t is not None}
    allowed = (x.dtype, torch.float32) if x.dtype in _REDUCED else (x.dtype,)
    if len(set(given.values())) > 1 or any(d not in allowed for d in given.values()):
        have = ", ".join(f"{name} {str(d).replace('torch.', '')}" for name, d in given.items())
        want = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise RuntimeError(
            f"mixed dtype: weight, bias, running_mean and running_var must share one dtype, {want} for "
            f"{str(x.dtype).replace('torch.', '')} input; got {have}"
        )


def check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, activation=None):
    """Validates the arguments of :func:`batch_norm` (before anything is changed) as torch does, raising torch's
    exception types, and returns ``(momentum, eps)`` as floats. The modules call it before counting a batch."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, got {_describe(input)}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm(): input must have at least 2 dims (N, C, *), got {input.dim()}D input")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm(): argument 'training' must be bool, not {_describe(training)}")
    if activation not in (None, "relu"):
        raise ValueError(f"batch_norm(): activation must be None or 'relu', got {activation!r}")
    if training and math.prod([input.shape[0], *input.shape[2:]]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    eps = _as_float("eps", eps)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if momentum is None:
        raise TypeError(
            "batch_norm(): argument 'momentum' must be float, not NoneType (the modules take momentum=None: a "
            "cumulative average)"
        )
    momentum = _as_float("momentum", momentum)
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f"batch_norm: input dtype {input.dtype} is not supported (a floating dtype is)")
    if (running_mean is None) != (running_var is None):
        if training:
            raise ValueError("running_mean and running_var must either both be None or neither be None")
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    params = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    for name, t in params.items():
        _check_per_channel(name, t, input)
    _check_param_dtypes(input, params)
    for name in ("running_mean", "running_var"):
        t = params[name]
        if t is None:
            continue
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"batch_norm is not differentiable with respect to {name}: it cannot require grad")
        if training and t.numel() > 1 and t.stride(0) == 0:
            raise RuntimeError(
                f"{name} is expanded (stride 0: every channel shares one element), so its in-place update is "
                f"ill-defined (torch's own result depends on thread order); pass a tensor with one element per "
                f"channel, e.g. {name}.clone()"
            )
    return momentum, eps


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float | Tensor = 1e-5,
    *,
    activation: Optional[str] = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` with the same semantics, plus ``activation="relu"`` fused.

    Input (N, C, *) of any layout (dense NCHW and channels_last run without copies; other strides are copied),
    fp16/bf16/fp32 (fp64 too) with fp32 statistics. Training normalizes with the batch statistics and, when given,
    updates ``running_mean`` and ``running_var`` (unbiased) in place with ``momentum``; eval uses the running
    statistics. ``weight``, ``bias`` and the running statistics may be strided (sliced, a column of a bigger
    buffer; read-only ones expanded too). ``momentum`` and ``eps`` may be 0-d tensors, as in torch.

    Errors are torch's (same exception types): ``eps <= 0`` in training or ``eps < 0`` raises ``ValueError``,
    parameters of mixed dtypes ``RuntimeError``, and so on; meta tensors give meta results, as torch's do. NaN and
    inf propagate as in torch: an inf input makes its channel's mean inf and variance NaN (outputs NaN), the fused
    ReLU keeps NaN. Expanded (stride-0) running statistics are refused in training, where torch's own update of
    them depends on thread order.
    """
    momentum, eps = check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation)
    weight, bias = (t.reshape(-1) if t is not None else None for t in (weight, bias))  # (1, C) works as in torch
    return _BatchNormFunction.apply(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation == "relu"
    )
