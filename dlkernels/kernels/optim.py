"""Triton optimizer updates (Adam/AdamW, SGD with momentum, SWATS): one launch per tensor, fp32 math.

The fallback on GPUs without ``dlkernels._C`` and the path run on CPU under the interpreter. Everything that
changes between steps (step counts, a tensor ``lr``, AMP ``grad_scale`` / ``found_inf``, the SWATS phase) is read
from device memory, so a step never waits on the host. Step counts are incremented by the launcher before the
kernels run (the kernels read the new count); a set ``found_inf`` masks every load and store, so the step is skipped.

Hyperparameters arrive as fp32 scalars; ``1 - beta`` is passed separately so bias corrections, computed in fp64
from it, stay accurate at step 1 where ``1 - beta2 ** 1`` would lose digits from a rounded ``beta2``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import store_rounded
from .launch import num_warps_for

BLOCK = 4096


@triton.jit
def _one_minus_pow(one_minus_base, exponent):
    """``1 - (1 - one_minus_base) ** exponent`` in fp64 by repeated squaring (exponent: a non-negative int64)."""
    base = 1.0 - tl.cast(one_minus_base, tl.float64)
    result = base * 0.0 + 1.0
    while exponent > 0:
        if (exponent & 1) == 1:
            result = result * base
        base = base * base
        exponent = exponent >> 1
    return 1.0 - result


@triton.jit
def _load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """The gradient in fp32, unscaled (and written back unscaled, as torch's fused optimizers do) under AMP."""
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr).to(tl.float32)
        store_rounded(grad_ptr, offsets, grad, mask)
    return grad


@triton.jit
def _live_mask(n_elements, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    if HAS_FOUND_INF:
        mask = mask & (tl.load(found_inf_ptr).to(tl.int32) == 0)
    return offsets, mask


@triton.jit
def _adam_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, step_ptr,
    lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, n_elements,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets, mask = _live_mask(n_elements, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_value, tl.float64)
    step = tl.load(step_ptr).to(tl.int64)
    bias_correction1 = _one_minus_pow(one_minus_beta1, step)
    bias_correction2_sqrt = tl.sqrt(_one_minus_pow(one_minus_beta2, step))
    step_size = (lr / bias_correction1).to(tl.float32)

    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = _load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE)
    if MAXIMIZE:
        grad = -grad
    if DECOUPLED:
        param = param * (1.0 - lr * weight_decay).to(tl.float32)
    else:
        grad = grad + weight_decay * param
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    store_rounded(exp_avg_ptr, offsets, exp_avg, mask)
    store_rounded(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        second_moment = tl.maximum(max_exp_avg_sq, exp_avg_sq)
        store_rounded(max_exp_avg_sq_ptr, offsets, second_moment, mask)
    denom = tl.sqrt(second_moment) / bias_correction2_sqrt.to(tl.float32) + eps
    param = param - step_size * (exp_avg / denom)
    store_rounded(param_ptr, offsets, param, mask)


@triton.jit
def _sgd_kernel(
    param_ptr, grad_ptr, momentum_buffer_ptr, lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, n_elements,
    momentum, one_minus_dampening, weight_decay,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets, mask = _live_mask(n_elements, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = _load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE)
    if MAXIMIZE:
        grad = -grad
    grad = grad + weight_decay * param
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buffer = grad  # torch starts the buffer at the gradient, without dampening
        else:
            buffer = tl.load(momentum_buffer_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            buffer = buffer * momentum + one_minus_dampening * grad
        store_rounded(momentum_buffer_ptr, offsets, buffer, mask)
        if NESTEROV:
            grad = grad + momentum * buffer
        else:
            grad = buffer
    param = param - lr * grad
    store_rounded(param_ptr, offsets, param, mask)


@triton.jit
def _swats_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, momentum_buffer_ptr, step_ptr, switch_state_ptr,
    lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, n_elements,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    """``switch_state``: the group's float64 vector [phase, lambda, sgd_lr, group_step, sum_pg, sum_pp] (layout in
    dlkernels.ops.optim). Adam (paper's form) while the group's phase is 0, accumulating p.g and p.p of the Adam step p; SGD with
    momentum at the estimated rate once the phase is 1. The phase is data, so both paths are masked, not branched."""
    offsets, mask = _live_mask(n_elements, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    # Flags compared as ints: the interpreter mis-broadcasts a float scalar comparison against a block.
    in_sgd_phase = tl.load(switch_state_ptr + 0).to(tl.int32) != 0  # SWATS_PHASE
    adam_mask = mask & (tl.load(switch_state_ptr + 0).to(tl.int32) == 0)
    sgd_mask = mask & in_sgd_phase
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_value, tl.float64)
    step = tl.load(step_ptr).to(tl.int64)
    adam_step_size = (lr * tl.sqrt(_one_minus_pow(one_minus_beta2, step)) / _one_minus_pow(one_minus_beta1, step))
    sgd_step_size = (one_minus_beta1 * tl.load(switch_state_ptr + 2)).to(tl.float32)  # SWATS_SGD_LR

    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = _load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE)
    grad = grad + weight_decay * param

    exp_avg = tl.load(exp_avg_ptr + offsets, mask=adam_mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=adam_mask, other=0.0).to(tl.float32)
    exp_avg = exp_avg * beta1 + one_minus_beta1 * grad
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    store_rounded(exp_avg_ptr, offsets, exp_avg, adam_mask)
    store_rounded(exp_avg_sq_ptr, offsets, exp_avg_sq, adam_mask)
    adam_update = -adam_step_size.to(tl.float32) * exp_avg / (tl.sqrt(exp_avg_sq) + eps)
    adam_update = tl.where(adam_mask, adam_update, 0.0)
    tl.atomic_add(switch_state_ptr + 4, tl.sum(adam_update * grad, axis=0).to(tl.float64))  # SWATS_SUM_PG
    tl.atomic_add(switch_state_ptr + 5, tl.sum(adam_update * adam_update, axis=0).to(tl.float64))  # SWATS_SUM_PP

    buffer = tl.load(momentum_buffer_ptr + offsets, mask=sgd_mask, other=0.0).to(tl.float32)
    buffer = buffer * beta1 + grad
    store_rounded(momentum_buffer_ptr, offsets, buffer, sgd_mask)

    param = tl.where(in_sgd_phase, param - sgd_step_size * buffer, param + adam_update)
    store_rounded(param_ptr, offsets, param, mask)


@triton.jit
def _swats_switch_kernel(switch_state_ptr, found_inf_ptr, one_minus_beta2, eps):
    """After a group's updates: the projection gamma = p.p / -p.g, its bias-corrected EMA lambda, and the switch to
    SGD at rate lambda once |lambda - gamma| < eps (from the second step on). Resets the accumulators."""
    found_inf = tl.load(found_inf_ptr)
    phase = tl.load(switch_state_ptr + 0)
    ema = tl.load(switch_state_ptr + 1)
    sgd_lr = tl.load(switch_state_ptr + 2)
    group_step = tl.load(switch_state_ptr + 3)
    sum_pg = tl.load(switch_state_ptr + 4)
    sum_pp = tl.load(switch_state_ptr + 5)
    group_step = tl.where(found_inf != 0, group_step, group_step + 1.0)
    estimating = (found_inf == 0) & (phase == 0.0) & (sum_pg != 0.0)
    gamma = sum_pp / tl.where(sum_pg != 0.0, -sum_pg, 1.0)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float64)
    new_ema = tl.where(estimating, (1.0 - one_minus_beta2) * ema + one_minus_beta2 * gamma, ema)
    corrected = new_ema / _one_minus_pow(one_minus_beta2, group_step.to(tl.int64))
    switch = estimating & (group_step > 1.0) & (tl.abs(corrected - gamma) < eps)
    tl.store(switch_state_ptr + 0, tl.where(switch | (phase != 0.0), 1.0, 0.0).to(tl.float64))
    tl.store(switch_state_ptr + 1, new_ema)
    tl.store(switch_state_ptr + 2, tl.where(switch, corrected, sgd_lr))
    tl.store(switch_state_ptr + 3, group_step)
    tl.store(switch_state_ptr + 4, sum_pg * 0.0)
    tl.store(switch_state_ptr + 5, sum_pp * 0.0)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def _lr_args(lr: float, lr_tensor: torch.Tensor | None, like: torch.Tensor):
    """(pointer, value, read-from-pointer) for the learning rate."""
    return (lr_tensor if lr_tensor is not None else like), float(lr), lr_tensor is not None


def _increment_steps(steps: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, 1.0 - found_inf.to(steps[0].dtype))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf) -> None:
    _increment_steps(steps, found_inf)
    for i, param in enumerate(params):
        n = param.numel()
        lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, param)
        _adam_kernel[_grid(n)](
            param, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else param, steps[i],
            lr_ptr, lr_value, grad_scale if grad_scale is not None else param,
            found_inf if found_inf is not None else param, n,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay, LR_FROM_PTR=lr_from_ptr,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK,
            num_warps=num_warps_for(BLOCK),
        )


def sgd_step(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum, dampening, weight_decay,
             nesterov, maximize, grad_scale, found_inf) -> None:
    for i, param in enumerate(params):
        n = param.numel()
        lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, param)
        _sgd_kernel[_grid(n)](
            param, grads[i], momentum_buffers[i] if momentum_buffers else param, lr_ptr, lr_value,
            grad_scale if grad_scale is not None else param, found_inf if found_inf is not None else param, n,
            momentum, 1.0 - dampening, weight_decay,
            HAS_MOMENTUM=bool(momentum_buffers), FIRST_STEP=first_step, NESTEROV=nesterov, MAXIMIZE=maximize,
            LR_FROM_PTR=lr_from_ptr, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            BLOCK=BLOCK, num_warps=num_warps_for(BLOCK),
        )


def swats_step(params, grads, exp_avgs, exp_avg_sqs, momentum_buffers, steps, switch_state, lr, lr_tensor, beta1,
               beta2, eps, weight_decay, grad_scale, found_inf) -> None:
    _increment_steps(steps, found_inf)
    for i, param in enumerate(params):
        n = param.numel()
        lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, param)
        _swats_kernel[_grid(n)](
            param, grads[i], exp_avgs[i], exp_avg_sqs[i], momentum_buffers[i], steps[i], switch_state,
            lr_ptr, lr_value, grad_scale if grad_scale is not None else param,
            found_inf if found_inf is not None else param, n,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
            LR_FROM_PTR=lr_from_ptr, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            BLOCK=BLOCK, num_warps=num_warps_for(BLOCK),
        )
    if found_inf is None:
        found_inf = torch.zeros((), dtype=torch.float32, device=switch_state.device)
    _swats_switch_kernel[(1,)](switch_state, found_inf, 1.0 - beta2, eps)
