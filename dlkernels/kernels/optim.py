"""Triton optimizer updates (Adam/AdamW, SGD with momentum, SWATS): one launch per param group, fp32 math.

The fallback on GPUs without ``dlkernels._C`` and the path run on CPU under the interpreter. A launch covers every
tensor of a group that shares one dtype signature (the dtype of each list) and alignment: the host builds an int64
pointer table (one row per list, a column per tensor, plus the step-count pointers and the sizes) and a block map
(tensor index and first element of every program); programs load their tensor's addresses from the table and cast
them to pointers. Tables are cached by the addresses they hold, so a steady training loop (and a CUDA graph capture
after a warm-up step) launches without building or copying them again.

Everything that changes between steps (step counts, a tensor ``lr``, AMP ``grad_scale`` / ``found_inf``, the SWATS
phase) is read from device memory, so a step never waits on the host. Step counts are incremented by the launcher
before the kernels run (the kernels read the new count); a set ``found_inf`` masks every load and store, so the step
is skipped. The bias corrections are per-program scalars (the program's tensor's step), computed in fp64 by repeated
squaring from ``1 - beta`` (passed separately so ``1 - beta2 ** 1`` keeps its digits).

NaN/Inf follow torch's for-loop optimizers: no weight decay term when ``weight_decay == 0`` (a ``-inf`` param stays
``-inf``), ``exp_avg`` by torch's two-sided ``lerp`` formula, a NaN-propagating ``max`` for AMSGrad, and torch's
operation order wherever an intermediate could overflow.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from .common import store_rounded
from .launch import gpu_launch_config, num_warps_for

# GPU programs: 2048 elements over 8 warps, 8 per thread (two 16-byte accesses per list): 48 registers for Adam fp32
# (ptxas sm_90), so 5 programs (40 warps) per SM keep ~280 KB of loads in flight per SM. 4096 elements took 156
# registers (one program per SM) with 8 warps and 80 with 16.
GPU_BLOCK, GPU_WARPS = 2048, 8
INTERPRETER_BLOCK = 64  # small, so CPU tests cover full (unmasked) blocks and tails alike

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --- pointer tables ------------------------------------------------------------------------------------------------


@triton.jit
def _tensor_ptr(table_ptr, row, t, n_tensors, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Row ``row`` of the pointer table for tensor ``t``, as a pointer to ``DTYPE`` (16-byte aligned if ALIGNED)."""
    ptr = tl.load(table_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # on the pointer, not the int64 address: only there does the hint reach the loads' vector width
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _block(table_ptr, block_tensor_ptr, block_start_ptr, n_tensors, NUMEL_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor, its first element, and whether the block lies wholly inside the tensor."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    numel = tl.load(table_ptr + NUMEL_ROW * n_tensors + t)
    return t, start, numel, start + BLOCK <= numel


@triton.jit
def _load(ptr, offsets, mask):
    if mask is None:
        value = tl.load(ptr + offsets)
    else:
        value = tl.load(ptr + offsets, mask=mask, other=0.0)
    return value.to(tl.float32)


@triton.jit
def _lerp(start, end, weight, one_minus_weight, SMALL_WEIGHT: tl.constexpr):
    """torch.lerp's formula (so the same NaN/Inf pattern): from ``start`` for weights below 0.5, else from ``end``."""
    if SMALL_WEIGHT:
        value = start + weight * (end - start)
    else:
        value = end - (end - start) * one_minus_weight
    return value


@triton.jit
def _maximum(a, b):
    """torch.maximum: NaN if either is NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


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
def _grad(grad_ptr, offsets, mask, grad_scale, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient in fp32, unscaled (and written back unscaled, as torch's fused optimizers do) under AMP."""
    grad = _load(grad_ptr, offsets, mask)
    if HAS_GRAD_SCALE:
        grad = grad / grad_scale
        store_rounded(grad_ptr, offsets, grad, mask)
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def _step_skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    skipped = False
    if HAS_FOUND_INF:
        skipped = tl.load(found_inf_ptr).to(tl.float32) != 0.0
    return skipped


@triton.jit
def _read_lr(lr_ptr, lr_value, LR_FROM_PTR: tl.constexpr):
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_value, tl.float64)
    return lr


@triton.jit
def _read_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    return grad_scale


# --- Adam / AdamW --------------------------------------------------------------------------------------------------

_ADAM_ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # then the step row, then the sizes


@triton.jit
def _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, mask,
                 neg_step_size, bias_correction2_sqrt, decay_factor, grad_scale,
                 one_minus_beta1, beta1, beta2, one_minus_beta2, eps, weight_decay,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                 SMALL_LERP_WEIGHT: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    param = _load(param_ptr, offsets, mask)
    grad = _grad(grad_ptr, offsets, mask, grad_scale, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * decay_factor
        else:
            grad = grad + weight_decay * param
    exp_avg = _lerp(_load(exp_avg_ptr, offsets, mask), grad, one_minus_beta1, beta1, SMALL_LERP_WEIGHT)
    exp_avg_sq = _load(exp_avg_sq_ptr, offsets, mask) * beta2 + one_minus_beta2 * grad * grad
    store_rounded(exp_avg_ptr, offsets, exp_avg, mask)
    store_rounded(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)
    second_moment = exp_avg_sq
    if AMSGRAD:
        second_moment = _maximum(_load(max_exp_avg_sq_ptr, offsets, mask), exp_avg_sq)
        store_rounded(max_exp_avg_sq_ptr, offsets, second_moment, mask)
    denom = tl.sqrt(second_moment) / bias_correction2_sqrt + eps
    store_rounded(param_ptr, offsets, param + (neg_step_size * exp_avg) / denom, mask)


@triton.jit
def _adam_kernel(
    table_ptr, block_tensor_ptr, block_start_ptr, n_tensors,
    lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    PARAM_T: tl.constexpr, GRAD_T: tl.constexpr, EXP_AVG_T: tl.constexpr, EXP_AVG_SQ_T: tl.constexpr,
    MAX_T: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr, SMALL_LERP_WEIGHT: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Table rows: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (AMSGRAD), step (float32), sizes."""
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    t, start, numel, full = _block(table_ptr, block_tensor_ptr, block_start_ptr, n_tensors, 6, BLOCK)
    param_ptr = _tensor_ptr(table_ptr, 0, t, n_tensors, PARAM_T, ALIGNED)
    grad_ptr = _tensor_ptr(table_ptr, 1, t, n_tensors, GRAD_T, ALIGNED)
    exp_avg_ptr = _tensor_ptr(table_ptr, 2, t, n_tensors, EXP_AVG_T, ALIGNED)
    exp_avg_sq_ptr = _tensor_ptr(table_ptr, 3, t, n_tensors, EXP_AVG_SQ_T, ALIGNED)
    max_exp_avg_sq_ptr = _tensor_ptr(table_ptr, 4, t, n_tensors, MAX_T, ALIGNED)
    step = tl.load(_tensor_ptr(table_ptr, 5, t, n_tensors, tl.float32, False)).to(tl.int64)

    lr = _read_lr(lr_ptr, lr_value, LR_FROM_PTR)
    neg_step_size = (-lr / _one_minus_pow(one_minus_beta1, step)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(_one_minus_pow(one_minus_beta2, step)).to(tl.float32)
    decay_factor = (1.0 - lr * weight_decay).to(tl.float32)
    grad_scale = _read_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE)
    offsets = start + tl.arange(0, BLOCK)
    if full:  # no mask: 16-byte vector accesses on the GPU
        _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, None,
                     neg_step_size, bias_correction2_sqrt, decay_factor, grad_scale,
                     one_minus_beta1, beta1, beta2, one_minus_beta2, eps, weight_decay,
                     AMSGRAD, MAXIMIZE, DECOUPLED, HAS_WEIGHT_DECAY, SMALL_LERP_WEIGHT, HAS_GRAD_SCALE)
    else:
        _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, offsets < numel,
                     neg_step_size, bias_correction2_sqrt, decay_factor, grad_scale,
                     one_minus_beta1, beta1, beta2, one_minus_beta2, eps, weight_decay,
                     AMSGRAD, MAXIMIZE, DECOUPLED, HAS_WEIGHT_DECAY, SMALL_LERP_WEIGHT, HAS_GRAD_SCALE)


# --- SGD -----------------------------------------------------------------------------------------------------------


@triton.jit
def _sgd_update(param_ptr, grad_ptr, momentum_buffer_ptr, offsets, mask, lr, grad_scale,
                momentum, one_minus_dampening, weight_decay,
                HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    param = _load(param_ptr, offsets, mask)
    grad = _grad(grad_ptr, offsets, mask, grad_scale, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buffer = grad  # torch starts the buffer at the gradient, without dampening
        else:
            buffer = _load(momentum_buffer_ptr, offsets, mask) * momentum + one_minus_dampening * grad
        store_rounded(momentum_buffer_ptr, offsets, buffer, mask)
        if NESTEROV:
            grad = grad + momentum * buffer
        else:
            grad = buffer
    store_rounded(param_ptr, offsets, param + -lr * grad, mask)


@triton.jit
def _sgd_kernel(
    table_ptr, block_tensor_ptr, block_start_ptr, n_tensors,
    lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr, momentum, one_minus_dampening, weight_decay,
    PARAM_T: tl.constexpr, GRAD_T: tl.constexpr, BUFFER_T: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Table rows: param, grad, momentum_buffer (HAS_MOMENTUM), sizes."""
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    t, start, numel, full = _block(table_ptr, block_tensor_ptr, block_start_ptr, n_tensors, 3, BLOCK)
    param_ptr = _tensor_ptr(table_ptr, 0, t, n_tensors, PARAM_T, ALIGNED)
    grad_ptr = _tensor_ptr(table_ptr, 1, t, n_tensors, GRAD_T, ALIGNED)
    buffer_ptr = _tensor_ptr(table_ptr, 2, t, n_tensors, BUFFER_T, ALIGNED)
    lr = _read_lr(lr_ptr, lr_value, LR_FROM_PTR).to(tl.float32)
    grad_scale = _read_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE)
    offsets = start + tl.arange(0, BLOCK)
    if full:
        _sgd_update(param_ptr, grad_ptr, buffer_ptr, offsets, None, lr, grad_scale, momentum, one_minus_dampening,
                    weight_decay, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE)
    else:
        _sgd_update(param_ptr, grad_ptr, buffer_ptr, offsets, offsets < numel, lr, grad_scale, momentum,
                    one_minus_dampening, weight_decay, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE,
                    HAS_WEIGHT_DECAY, HAS_GRAD_SCALE)


# --- SWATS ---------------------------------------------------------------------------------------------------------


@triton.jit
def _swats_kernel(
    table_ptr, block_tensor_ptr, block_start_ptr, n_tensors, switch_state_ptr,
    lr_ptr, lr_value, grad_scale_ptr, found_inf_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    PARAM_T: tl.constexpr, GRAD_T: tl.constexpr, EXP_AVG_T: tl.constexpr, EXP_AVG_SQ_T: tl.constexpr,
    BUFFER_T: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Table rows: param, grad, exp_avg, exp_avg_sq, momentum_buffer, step, sizes. ``switch_state``: the group's
    float64 vector [phase, lambda, sgd_lr, group_step, sum_pg, sum_pp] (layout in dlkernels.ops.optim). Adam (the
    paper's form) while the phase is 0, accumulating p.g and p.p of the Adam step p; SGD with momentum at the estimated
    rate once it is 1. The phase is data, so both paths are masked, not branched."""
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    t, start, numel, full = _block(table_ptr, block_tensor_ptr, block_start_ptr, n_tensors, 6, BLOCK)
    param_ptr = _tensor_ptr(table_ptr, 0, t, n_tensors, PARAM_T, ALIGNED)
    grad_ptr = _tensor_ptr(table_ptr, 1, t, n_tensors, GRAD_T, ALIGNED)
    exp_avg_ptr = _tensor_ptr(table_ptr, 2, t, n_tensors, EXP_AVG_T, ALIGNED)
    exp_avg_sq_ptr = _tensor_ptr(table_ptr, 3, t, n_tensors, EXP_AVG_SQ_T, ALIGNED)
    buffer_ptr = _tensor_ptr(table_ptr, 4, t, n_tensors, BUFFER_T, ALIGNED)
    step = tl.load(_tensor_ptr(table_ptr, 5, t, n_tensors, tl.float32, False)).to(tl.int64)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    # Flags compared as ints: the interpreter mis-broadcasts a float scalar comparison against a block.
    in_sgd_phase = tl.load(switch_state_ptr + 0).to(tl.int32) != 0  # SWATS_PHASE
    adam_mask = mask & (tl.load(switch_state_ptr + 0).to(tl.int32) == 0)
    sgd_mask = mask & in_sgd_phase
    lr = _read_lr(lr_ptr, lr_value, LR_FROM_PTR)
    adam_step_size = (lr * tl.sqrt(_one_minus_pow(one_minus_beta2, step)) / _one_minus_pow(one_minus_beta1, step))
    sgd_step_size = (one_minus_beta1 * tl.load(switch_state_ptr + 2)).to(tl.float32)  # SWATS_SGD_LR

    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = _grad(grad_ptr, offsets, mask, _read_grad_scale(grad_scale_ptr, HAS_GRAD_SCALE), HAS_GRAD_SCALE, False)
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param

    exp_avg = tl.load(exp_avg_ptr + offsets, mask=adam_mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=adam_mask, other=0.0).to(tl.float32)
    exp_avg = exp_avg * beta1 + one_minus_beta1 * grad
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    store_rounded(exp_avg_ptr, offsets, exp_avg, adam_mask)
    store_rounded(exp_avg_sq_ptr, offsets, exp_avg_sq, adam_mask)
    adam_update = -adam_step_size.to(tl.float32) * exp_avg / (tl.sqrt(exp_avg_sq) + eps)
    adam_update = tl.where(adam_mask, adam_update, 0.0)
    # Relaxed: the sums are read by the next launch (_swats_switch_kernel), which the launch boundary orders; the
    # default acq_rel would put two GPU-scope fences in every program.
    tl.atomic_add(switch_state_ptr + 4, tl.sum(adam_update * grad, axis=0).to(tl.float64), sem="relaxed")  # SUM_PG
    tl.atomic_add(switch_state_ptr + 5, tl.sum(adam_update * adam_update, axis=0).to(tl.float64),
                  sem="relaxed")  # SWATS_SUM_PP

    buffer = tl.load(buffer_ptr + offsets, mask=sgd_mask, other=0.0).to(tl.float32)
    buffer = buffer * beta1 + grad
    store_rounded(buffer_ptr, offsets, buffer, sgd_mask)

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


# --- host side -----------------------------------------------------------------------------------------------------


class _Launch(collections.namedtuple("_Launch", "table block_tensor block_start n_tensors grid dtypes aligned")):
    """One launch's tables: ``table`` int64 (rows, n_tensors) of addresses (+ a last row of sizes), ``block_tensor``
    int32 and ``block_start`` int64 per program."""


_TABLE_CACHE: collections.OrderedDict = collections.OrderedDict()
_TABLE_CACHE_SIZE = 64


def _block_size(device: torch.device) -> tuple[int, int]:
    """(elements, warps) per program."""
    if gpu_launch_config(device):
        return GPU_BLOCK, GPU_WARPS
    return INTERPRETER_BLOCK, num_warps_for(INTERPRETER_BLOCK)


def _launches(lists: list[list[torch.Tensor]], steps: list[torch.Tensor] | None, block: int) -> list[_Launch]:
    """The launches covering ``lists`` (lists[0]: the params; an empty list stands for "absent": its row repeats the
    params' addresses), one per (dtype signature, alignment) bucket."""
    params = lists[0]
    rows = [lst if lst else params for lst in lists]
    key = (block, params[0].device, tuple(t.dtype for lst in rows for t in lst),
           tuple(t.data_ptr() for lst in rows for t in lst), tuple(t.numel() for t in params),
           tuple(s.data_ptr() for s in steps) if steps is not None else None)
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        _TABLE_CACHE.move_to_end(key)
        return cached
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        dtypes = tuple(lst[i].dtype for lst in rows)
        aligned = all(lst[i].data_ptr() % 16 == 0 for lst in rows)
        buckets.setdefault((dtypes, aligned), []).append(i)
    launches = []
    for (dtypes, aligned), indices in buckets.items():
        columns = [[lst[i].data_ptr() for i in indices] for lst in rows]
        if steps is not None:
            columns.append([steps[i].data_ptr() for i in indices])
        numels = [params[i].numel() for i in indices]
        columns.append(numels)
        blocks = [triton.cdiv(n, block) for n in numels]
        block_tensor = torch.repeat_interleave(torch.arange(len(indices), dtype=torch.int32), torch.tensor(blocks))
        first_block = torch.tensor([0] + blocks[:-1]).cumsum(0)
        block_start = (torch.arange(sum(blocks)) - first_block.repeat_interleave(torch.tensor(blocks))) * block
        device = params[0].device
        launches.append(_Launch(
            torch.tensor(columns, dtype=torch.int64).to(device), block_tensor.to(device),
            block_start.to(device=device, dtype=torch.int64), len(indices), (sum(blocks),),
            tuple(_TL_DTYPES[d] for d in dtypes), aligned,
        ))
    _TABLE_CACHE[key] = launches
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return launches


def _lr_args(lr: float, lr_tensor: torch.Tensor | None, like: torch.Tensor):
    """(pointer, value, read-from-pointer) for the learning rate."""
    return (lr_tensor if lr_tensor is not None else like), float(lr), lr_tensor is not None


def _optional(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like


def _increment_steps(steps: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, 1.0 - found_inf.to(steps[0].dtype))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf) -> None:
    """One launch per dtype bucket; every param must appear once (the op splits duplicates into rounds)."""
    _increment_steps(steps, found_inf)
    block, num_warps = _block_size(params[0].device)
    like = params[0]
    lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, like)
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    for launch in _launches(lists, steps, block):
        _adam_kernel[launch.grid](
            launch.table, launch.block_tensor, launch.block_start, launch.n_tensors,
            lr_ptr, lr_value, _optional(grad_scale, like), _optional(found_inf, like),
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
            PARAM_T=launch.dtypes[0], GRAD_T=launch.dtypes[1], EXP_AVG_T=launch.dtypes[2],
            EXP_AVG_SQ_T=launch.dtypes[3], MAX_T=launch.dtypes[4],
            AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay, HAS_WEIGHT_DECAY=weight_decay != 0,
            SMALL_LERP_WEIGHT=abs(1.0 - beta1) < 0.5, LR_FROM_PTR=lr_from_ptr, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=launch.aligned, BLOCK=block, num_warps=num_warps,
        )


def sgd_step(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum, dampening, weight_decay,
             nesterov, maximize, grad_scale, found_inf) -> None:
    block, num_warps = _block_size(params[0].device)
    like = params[0]
    lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, like)
    for launch in _launches([params, grads, momentum_buffers], None, block):
        _sgd_kernel[launch.grid](
            launch.table, launch.block_tensor, launch.block_start, launch.n_tensors,
            lr_ptr, lr_value, _optional(grad_scale, like), _optional(found_inf, like),
            momentum, 1.0 - dampening, weight_decay,
            PARAM_T=launch.dtypes[0], GRAD_T=launch.dtypes[1], BUFFER_T=launch.dtypes[2],
            HAS_MOMENTUM=bool(momentum_buffers), FIRST_STEP=first_step, NESTEROV=nesterov, MAXIMIZE=maximize,
            HAS_WEIGHT_DECAY=weight_decay != 0, LR_FROM_PTR=lr_from_ptr, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=launch.aligned, BLOCK=block, num_warps=num_warps,
        )


def swats_step(params, grads, exp_avgs, exp_avg_sqs, momentum_buffers, steps, switch_state, lr, lr_tensor, beta1,
               beta2, eps, weight_decay, grad_scale, found_inf, finalize=True) -> None:
    """``finalize``: update the switch estimate after the updates (a group split into rounds does it once, last)."""
    _increment_steps(steps, found_inf)
    block, num_warps = _block_size(params[0].device)
    like = params[0]
    lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, lr_tensor, like)
    for launch in _launches([params, grads, exp_avgs, exp_avg_sqs, momentum_buffers], steps, block):
        _swats_kernel[launch.grid](
            launch.table, launch.block_tensor, launch.block_start, launch.n_tensors, switch_state,
            lr_ptr, lr_value, _optional(grad_scale, like), _optional(found_inf, like),
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
            PARAM_T=launch.dtypes[0], GRAD_T=launch.dtypes[1], EXP_AVG_T=launch.dtypes[2],
            EXP_AVG_SQ_T=launch.dtypes[3], BUFFER_T=launch.dtypes[4], HAS_WEIGHT_DECAY=weight_decay != 0,
            LR_FROM_PTR=lr_from_ptr, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=launch.aligned, BLOCK=block, num_warps=num_warps,
        )
    if finalize:
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=switch_state.device)
        _swats_switch_kernel[(1,)](switch_state, found_inf, 1.0 - beta2, eps)
