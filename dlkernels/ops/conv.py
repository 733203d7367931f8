"""2-D convolution + bias + ReLU + max/avg pooling, fused, as ``torch.library`` custom ops.

``conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None, pool=None)``
computes ``F.conv2d`` (same arguments and semantics, ``padding`` also ``"same"``/``"valid"``), then ReLU when
``activation="relu"``, then ``pool=("max"|"avg", kernel_size[, stride])`` (stride defaults to the kernel size; no
padding, ``ceil_mode=False``: rows/columns that do not fill a window are dropped, as torch does; average pools divide
by the window size).

Implementations (``dlkernels.backend``):
- Triton implicit GEMM (``dlkernels.kernels.conv``), no im2col buffer, for fp16/bf16, and for fp32 where torch lets
  cuDNN use TF32 (``torch.backends.cudnn.allow_tf32``, default True; fp32 dots are TF32 on the GPU, IEEE fp32 under
  the interpreter). The input is read through its strides: channels_last without copies (the fast layout); on the GPU
  an input whose channels are not contiguous (NCHW) is copied once to channels_last (2 x its bytes, per forward and
  per weight-gradient backward), under the interpreter it is read in place. ``groups=1`` only.
- The eager reference (``F.conv2d`` -> ``relu`` -> ``max_pool2d``/``avg_pool2d``): the CPU fallback and test oracle.
  fp64, fp32 with TF32 disallowed, ``groups > 1`` and average pools with ReLU over windows of more than 31 positions
  take it, with a warn-once fallback where a kernel backend runs (CUDA tensors, or the interpreter).

The forward never writes the full-resolution activation: the pooling window is reduced inside the output tile. For
the backward it saves, per pooled output element, a small integer ``code``:
- max pool: the position of the maximum inside its window (row-major, first maximum wins, NaN wins as in torch;
  ``-1`` where ReLU zeroed the output, so no gradient flows): int8 (int32 for windows above 127 positions);
- average pool with ReLU: a bitmask of the window positions where the ReLU was active (int8/16/32/64 for windows
  of up to 7/15/31/63 positions);
- otherwise nothing (an empty tensor); ReLU without a pool reads its mask from the saved output, as torch does.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

OP = "conv2d"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POOL_NONE, POOL_MAX, POOL_AVG = 0, 1, 2
_POOL_KINDS = {"max": POOL_MAX, "avg": POOL_AVG}
_MAX_AVG_RELU_WINDOW = 63  # bits of the largest code container (int64)
_MAX_KERNEL_AVG_RELU_WINDOW = 31  # the kernels build the mask in 32-bit registers


# ---------------------------------------------------------------------------------------------------------------
# Argument normalization and checks (torch's kinds of errors and messages).


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        if len(value) == 1:
            return int(value[0]), int(value[0])
        if len(value) == 2:
            return int(value[0]), int(value[1])
    raise RuntimeError(
        f"expected {name} to be a single integer value or a list of 2 values to match the convolution "
        f"dimensions, but got {name}={list(value) if isinstance(value, (tuple, list)) else value!r}"
    )


def _padding(padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """[top, bottom, left, right]; ``"same"`` pads ``dilation * (k - 1)`` in all, the extra one at the end as torch."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise RuntimeError(f"Invalid padding string: {padding!r}")
        if stride != (1, 1):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise RuntimeError("negative padding is not supported")
    return [ph, ph, pw, pw]


def _pool_args(pool) -> list[int]:
    """[kind, kernel_h, kernel_w, stride_h, stride_w]; kind 0 = no pool."""
    if pool is None:
        return [POOL_NONE, 1, 1, 1, 1]
    if not isinstance(pool, (tuple, list)) or len(pool) not in (2, 3):
        raise ValueError(f"pool must be None or (kind, kernel_size[, stride]), got {pool!r}")
    kind, kernel = pool[0], pool[1]
    stride = pool[2] if len(pool) == 3 and pool[2] is not None else kernel
    if kind not in _POOL_KINDS:
        raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
    try:
        kh, kw = _pair(kernel, "pool kernel_size")
        sh, sw = _pair(stride, "pool stride")
    except RuntimeError as exc:
        raise ValueError(str(exc).replace("convolution", "pooling")) from None
    if min(kh, kw) <= 0:
        raise ValueError(f"pool kernel_size must be positive, got {kernel!r}")
    if min(sh, sw) <= 0:
        raise ValueError(f"pool stride must be positive, got {stride!r}")
    return [_POOL_KINDS[kind], kh, kw, sh, sw]


def conv_output_size(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + padding[0] + padding[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def pooled_size(oh: int, ow: int, pool: Sequence[int]) -> tuple[int, int]:
    if pool[0] == POOL_NONE:
        return oh, ow
    return (oh - pool[1]) // pool[3] + 1, (ow - pool[2]) // pool[4] + 1


def _check(input, weight, bias, groups) -> None:
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv2d: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"conv2d: bias must be a Tensor or None, got {type(bias).__name__}")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input.shape)}"
        )
    if weight.dim() != 4:
        raise RuntimeError(f"conv2d: weight must be 4-D (out_channels, in_channels/groups, kH, kW), got size "
                           f"{list(weight.shape)}")
    if input.dtype not in _FLOATS:
        raise NotImplementedError(f"conv2d: input dtype {input.dtype} is not supported (a floating dtype is)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise RuntimeError(f"conv2d: input type ({input.dtype}) and {name} type ({t.dtype}) should be the same")
        if t.device != input.device:
            raise RuntimeError(f"conv2d: input is on {input.device} but {name} is on {t.device}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"conv2d: groups must be an int, got {groups!r}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    c_out, c_in_group = weight.shape[0], weight.shape[1]
    if c_out % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but got weight of "
            f"size {list(weight.shape)} instead"
        )
    c_in = input.shape[-3]
    if c_in != c_in_group * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} to have "
            f"{c_in_group * groups} channels, but got {c_in} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with {c_out} elements, "
            f"but got bias of size {list(bias.shape)} instead"
        )


# ---------------------------------------------------------------------------------------------------------------
# Layouts and the saved codes.


def output_format(x: Tensor) -> torch.memory_format:
    """Outputs follow the input: channels_last when the input is (and is not also NCHW-contiguous), as torch."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def code_dtype(relu: bool, pool: Sequence[int]) -> Optional[torch.dtype]:
    """dtype of the per-pooled-output code (module docstring), or None when nothing is saved."""
    positions = pool[1] * pool[2]
    if pool[0] == POOL_MAX:
        return torch.int8 if positions <= 127 else torch.int32
    if pool[0] == POOL_AVG and relu:
        for dtype, bits in ((torch.int8, 7), (torch.int16, 15), (torch.int32, 31), (torch.int64, 63)):
            if positions <= bits:
                return dtype
        return torch.bool  # larger windows: the reference saves the full-resolution ReLU mask instead
    return None


def _empty_outputs(x, weight, stride, padding, dilation, relu, pool) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    oh, ow = conv_output_size(h, w, weight.shape[2:], stride, padding, dilation)
    ph, pw = pooled_size(oh, ow, pool)
    fmt = output_format(x)
    out = x.new_empty((n, weight.shape[0], ph, pw)).contiguous(memory_format=fmt)
    dtype = code_dtype(relu, pool)
    if dtype is None:
        code = x.new_empty(0, dtype=torch.int8)
    elif dtype == torch.bool:
        code = x.new_empty((n, weight.shape[0], oh, ow), dtype=torch.bool).contiguous(memory_format=fmt)
    else:
        code = x.new_empty((n, weight.shape[0], ph, pw), dtype=dtype).contiguous(memory_format=fmt)
    return out, code


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (eager PyTorch in the input's dtype): CPU fallback and test oracle.


def _reference_conv(x, weight, bias, stride, padding, dilation, groups):
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


def _reference_pool(y, pool, return_indices=False):
    kind, kh, kw, sh, sw = pool
    if kind == POOL_MAX:
        return F.max_pool2d(y, (kh, kw), (sh, sw), return_indices=return_indices)
    if kind == POOL_AVG:
        return F.avg_pool2d(y, (kh, kw), (sh, sw))
    return y


def reference_forward(x, weight, bias, stride, padding, dilation, groups, relu, pool):
    """(out, code) as the kernels return them (see the module docstring for ``code``)."""
    z = _reference_conv(x, weight, bias, stride, padding, dilation, groups)
    y = torch.relu(z) if relu else z
    out, code = _empty_outputs(x, weight, stride, padding, dilation, relu, pool)
    kind, kh, kw, sh, sw = pool
    if kind == POOL_MAX:
        pooled, index = _reference_pool(y, pool, return_indices=True)
        ph, pw = pooled.shape[2:]
        # Flat index into the conv output plane -> position inside the window.
        rows = torch.arange(ph, device=x.device).view(-1, 1) * sh
        cols = torch.arange(pw, device=x.device).view(1, -1) * sw
        window = (index // y.shape[3] - rows) * kw + (index % y.shape[3] - cols)
        if relu:
            window = torch.where(pooled > 0, window, -1)
        code.copy_(window)
    else:
        pooled = _reference_pool(y, pool)
        if code.dtype == torch.bool:
            code.copy_(z > 0)
        elif code.numel():
            active = F.unfold((z > 0).to(torch.float64), (kh, kw), stride=(sh, sw))  # (N, C*kh*kw, L)
            n, c = z.shape[:2]
            active = active.view(n, c, kh * kw, -1).to(torch.int64)
            bits = (active << torch.arange(kh * kw, device=x.device).view(1, 1, -1, 1)).sum(2)
            code.copy_(bits.view(n, c, *pooled.shape[2:]))
    out.copy_(pooled)
    return out, code


def reference_backward(grad_out, x, weight, bias, stride, padding, dilation, groups, relu, pool, output_mask):
    """Recomputes the forward in eager PyTorch and runs torch's own backward ops (the custom op runs below
    autograd, so no autograd replay here)."""
    aten = torch.ops.aten
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    xp = x if symmetric else F.pad(x, (left, right, top, bottom))
    conv_padding = [top, left] if symmetric else [0, 0]
    z = F.conv2d(xp, weight, bias, stride, conv_padding, dilation, groups)
    y = torch.relu(z) if relu else z
    kind, kh, kw, sh, sw = pool
    g = grad_out
    if kind == POOL_MAX:
        _, index = F.max_pool2d(y, (kh, kw), (sh, sw), return_indices=True)
        g = aten.max_pool2d_with_indices_backward(g, y, [kh, kw], [sh, sw], [0, 0], [1, 1], False, index)
    elif kind == POOL_AVG:
        g = aten.avg_pool2d_backward(g, y, [kh, kw], [sh, sw], [0, 0], False, True, None)
    if relu:
        g = aten.threshold_backward(g, y, 0)
    bias_sizes = [weight.shape[0]] if bias is not None else None
    dx, dw, db = aten.convolution_backward(
        g, xp, weight, bias_sizes, list(stride), conv_padding, list(dilation), False, [0, 0], groups, output_mask
    )
    if dx is not None and not symmetric:
        dx = dx[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    # Gradients in their inputs' layouts (what the fake implementation promises).
    dx = torch.empty_like(x).copy_(dx) if dx is not None else None
    dw = torch.empty_like(weight).copy_(dw) if dw is not None else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------
# Custom ops.


def unsupported(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, relu: bool,
                pool: Sequence[int]) -> Optional[str]:
    """Why the Triton kernels cannot take this call (a valid configuration), or None."""
    oh, ow = conv_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if max(x[0].numel(), weight.shape[0] * oh * ow) >= 2**31:
        return "one sample of more than 2^31 elements (the kernels index within a sample in 32 bits)"
    if x.dtype == torch.float64:
        return "float64 inputs (the kernels are fp16/bf16, and fp32 with TF32)"
    if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "float32 inputs with torch.backends.cudnn.allow_tf32 = False (the fp32 kernel uses TF32 dots)"
    if groups != 1:
        return "groups > 1"
    if pool[0] == POOL_AVG and relu and pool[1] * pool[2] > _MAX_KERNEL_AVG_RELU_WINDOW:
        return f"average pools with ReLU over windows of more than {_MAX_KERNEL_AVG_RELU_WINDOW} positions"
    return None


@torch.library.custom_op("dlkernels::conv2d_forward", mutates_args=())
def conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    pool: list[int],
) -> tuple[Tensor, Tensor]:
    """Returns (out, code); ``padding`` is [top, bottom, left, right], ``pool`` [kind, kh, kw, sh, sw]."""
    if x.shape[0] == 0:
        out, code = _empty_outputs(x, weight, stride, padding, dilation, relu, pool)
        return out, code.zero_()
    impl = _backend.choose(OP, x.device, unsupported=unsupported(x, weight, stride, padding, dilation, groups, relu, pool))
    if impl == "reference":
        return reference_forward(x, weight, bias, stride, padding, dilation, groups, relu, pool)
    from ..kernels import conv as kernels

    out, code = _empty_outputs(x, weight, stride, padding, dilation, relu, pool)
    kernels.conv_forward(x, weight, bias, out, code, stride, padding, dilation, relu, pool)
    return out, code


@conv2d_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, relu, pool):
    return _empty_outputs(x, weight, stride, padding, dilation, relu, pool)


@torch.library.custom_op("dlkernels::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    code: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    pool: list[int],
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); one not asked for in ``output_mask`` is an empty tensor.
    ``out`` is read only for ReLU without a pool (its mask), ``code`` for the pools (module docstring)."""
    output_mask = [output_mask[0], output_mask[1], output_mask[2] and bias is not None]
    if x.shape[0] == 0:
        dx, dw, db = torch.zeros_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)
    elif _backend.choose(OP, x.device, unsupported=unsupported(x, weight, stride, padding, dilation, groups, relu, pool)) == "reference":
        dx, dw, db = reference_backward(grad_out, x, weight, bias, stride, padding, dilation, groups, relu, pool,
                                        output_mask)
    else:
        from ..kernels import conv as kernels

        dx, dw, db = kernels.conv_backward(grad_out, x, weight, out, code, stride, padding, dilation, relu, pool,
                                           output_mask)
    return (
        dx if output_mask[0] else x.new_empty(0),
        dw if output_mask[1] else x.new_empty(0),
        db if output_mask[2] else x.new_empty(0),
    )


@conv2d_backward.register_fake
def _(grad_out, x, weight, bias, out, code, stride, padding, dilation, groups, relu, pool, output_mask):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(weight) if output_mask[1] else x.new_empty(0),
        torch.empty_like(bias) if output_mask[2] and bias is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, relu, pool = inputs
    out, code = output
    # The output is saved only where it is ReLU's mask (no pool); a pool saves its small code instead.
    keep_out = relu and pool[0] == POOL_NONE
    ctx.save_for_backward(x, weight, bias, out if keep_out else None, code)
    ctx.options = (stride, padding, dilation, groups, relu, pool)
    ctx.mark_non_differentiable(code)


def _differentiable_backward(ctx, grad_out, x, weight, bias, mask):
    """Double backward (create_graph=True): the gradients of the eager reference, which autograd differentiates
    again (the kernels' backward has no derivative of its own)."""
    _backend.warn_fallback(OP, "double backward (create_graph=True) is differentiated through the reference")
    stride, padding, dilation, groups, relu, pool = ctx.options
    top, bottom, left, right = padding
    z = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
    y = _reference_pool(torch.relu(z) if relu else z, pool)
    wanted = [t for t, m in zip((x, weight, bias), mask) if m]
    grads = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if m else None for m in mask)


def _backward(ctx, grad_out, grad_code):
    x, weight, bias, out, code = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if torch.is_grad_enabled():
        dx, dw, db = _differentiable_backward(ctx, grad_out, x, weight, bias, mask)
        return dx, dw, db, None, None, None, None, None, None
    if out is None:
        out = x.new_empty(0)
    dx, dw, db = torch.ops.dlkernels.conv2d_backward(grad_out, x, weight, bias, out, code, *ctx.options, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None), \
        None, None, None, None, None, None


conv2d_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function.


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    activation: Optional[str] = None,
    pool=None,
) -> Tensor:
    """``F.conv2d`` -> optional ReLU -> optional max/avg pool, fused (module docstring).

    ``activation``: None or ``"relu"``. ``pool``: None or ``(kind, kernel_size)`` or ``(kind, kernel_size,
    stride)`` with kind ``"max"`` or ``"avg"``, ints or pairs, stride defaulting to ``kernel_size``. Input (N, C, H, W)
    or unbatched (C, H, W), any strides (channels_last is the kernels' fast layout); output in the input's layout.
    """
    _check(input, weight, bias, groups)
    if activation not in (None, "relu"):
        raise ValueError(f"conv2d: activation must be None or 'relu', got {activation!r}")
    pool_args = _pool_args(pool)
    stride_hw, dilation_hw = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride_hw) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation_hw) <= 0:
        raise RuntimeError("dilation should be greater than zero")
    kernel = tuple(weight.shape[2:])
    pad = _padding(padding, kernel, stride_hw, dilation_hw)
    h, w = input.shape[-2:]
    padded = (h + pad[0] + pad[1], w + pad[2] + pad[3])
    effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation_hw))
    if padded[0] < effective[0] or padded[1] < effective[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({effective[0]} x {effective[1]}). Kernel size can't be greater than actual input size"
        )
    oh, ow = conv_output_size(h, w, kernel, stride_hw, pad, dilation_hw)
    if pool_args[0] != POOL_NONE and (oh < pool_args[1] or ow < pool_args[2]):
        raise RuntimeError(
            f"conv2d: pool kernel_size ({pool_args[1]} x {pool_args[2]}) is larger than the convolution output "
            f"({oh} x {ow}): output size is too small"
        )
    if torch.is_autocast_enabled(input.device.type):  # as F.conv2d, which is on autocast's lower-precision list
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight, bias = (t.to(dtype) if t is not None else None for t in (input, weight, bias))
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out, _ = torch.ops.dlkernels.conv2d_forward(
        x, weight, bias, list(stride_hw), pad, list(dilation_hw), int(groups), activation == "relu", pool_args
    )
    return out.squeeze(0) if unbatched else out
