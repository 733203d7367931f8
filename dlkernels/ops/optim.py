"""Optimizer steps as mutating custom ops: ``dlkernels::adam_step``, ``sgd_step`` and ``swats_step``.

Each updates a list of parameters and their state in place. Backends: the CUDA C++ multi-tensor kernel (one launch
per dtype bucket, normally one per group), the Triton kernels (one launch per dtype and alignment bucket, through
pointer tables) and the reference, which is torch's own single-tensor optimizer math (``torch.optim.adam.adam`` /
``torch.optim.sgd.sgd``) and, for SWATS, the paper's algorithm in eager PyTorch. Step counts, a tensor ``lr``, the
AMP ``grad_scale`` (gradients are divided by it, and written back unscaled) and ``found_inf`` (non-zero: the step is
skipped, step counts included) are read from device memory by the kernels.

Semantics are torch's for-loop optimizers', NaN/Inf included. A tensor listed twice (torch warns, then updates it
twice in a row) is updated in rounds, never by two programs of one launch. The fake kernels check devices, shapes
and lists too: they are also the Meta kernels, which a real call reaches when any argument is on the meta device.

SWATS keeps one float64 vector per parameter group (``SWATS_STATE_SIZE`` entries, see the ``SWATS_*`` indices):
the phase (0 Adam, 1 SGD), the EMA lambda of the projected rate gamma, the SGD rate chosen at the switch, the group's
step count and two accumulators for the projection.
"""
from __future__ import annotations

import itertools
import operator
from typing import Optional

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from .. import _backend

SWATS_PHASE, SWATS_LAMBDA, SWATS_SGD_LR, SWATS_STEP, SWATS_SUM_PG, SWATS_SUM_PP = range(6)
SWATS_STATE_SIZE = 6


def _check_lists(op: str, params: list[Tensor], **lists: list[Tensor]) -> None:
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"dlkernels.{op}: {name} has {len(tensors)} tensors, params has {len(params)}")
    device = params[0].device
    for name, tensors in {"params": params, **lists}.items():
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"dlkernels.{op}: {name}[{i}] is on {t.device}, params[0] on {device}")
            if name == "steps" and t.numel() != 1:
                raise ValueError(f"dlkernels.{op}: steps[{i}] must have one element, got shape {tuple(t.shape)}")
            if name != "steps" and t.shape != params[i].shape:
                raise ValueError(
                    f"dlkernels.{op}: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] {tuple(params[i].shape)}"
                )
            if not t.is_floating_point():
                raise TypeError(f"dlkernels.{op}: {name}[{i}] must be floating point, got {t.dtype}")
            if t.is_sparse:
                raise RuntimeError(f"dlkernels.{op}: {name}[{i}] is sparse; sparse gradients are not supported")


def _check_scalars(op: str, params: list[Tensor], **scalars: Optional[Tensor]) -> None:
    device = params[0].device
    for name, t in scalars.items():
        if t is not None and (t.numel() != 1 or t.device != device):
            raise ValueError(f"dlkernels.{op}: {name} must be a 1-element tensor on {device}, got "
                             f"{tuple(t.shape)} on {t.device}")


KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _unsupported(tensor_lists: list[list[Tensor]], steps: Optional[list[Tensor]] = None) -> Optional[str]:
    """Why the kernels (fp32 math on flat contiguous storage, float32 step counts) cannot serve these tensors, or
    None. Runs every step, so it loops in C where it can (a step over hundreds of tensors must stay cheap)."""
    all_tensors = list(itertools.chain.from_iterable(tensor_lists))
    dtypes = {t.dtype for t in all_tensors}
    if not dtypes <= KERNEL_DTYPES:
        return f"{sorted(map(str, dtypes - KERNEL_DTYPES))} tensors (the kernels cover float32, float16 and bfloat16)"
    if not all(map(Tensor.is_contiguous, all_tensors)):
        return "non-contiguous parameters, gradients or state"
    if steps and {s.dtype for s in steps} != {torch.float32}:
        return "step counts that are not float32"
    return None


def _rounds(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` in update rounds: round k holds the k-th occurrence of every param, so a param listed
    twice (torch warns, then updates it twice in a row, its step count moving on in between) is updated twice in
    sequence, never by two programs of one launch. Almost always one round holding every index."""
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        key = p.data_ptr() if p.numel() else -1 - i  # empty tensors alias nothing
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _pick(lists: list[list[Tensor]], indices: list[int]) -> list[list[Tensor]]:
    """Each list (an empty one stays empty) restricted to ``indices``."""
    return [[lst[i] for i in indices] if lst else lst for lst in lists]


def _choose(op: str, tensor_lists: list[list[Tensor]], steps: Optional[list[Tensor]] = None) -> str:
    params, grads = tensor_lists[0], tensor_lists[1]
    impl = _backend.choose(op, params[0].device, has_cuda=True, unsupported=_unsupported(tensor_lists, steps))
    if impl == "cuda" and any(map(operator.ne, (p.dtype for p in params), (g.dtype for g in grads))):
        return "triton"  # the CUDA kernels take gradients in their parameter's dtype; Triton converts any
    return impl


def _run_cuda(name: str, args: tuple, device: torch.device) -> None:
    """Calls ``dlkernels._C.<name>`` on the current stream of ``device`` (the binding needs no CUDA headers)."""
    getattr(_backend.cuda_extension(), name)(*args, torch.cuda.current_stream(device).cuda_stream)


def _skipped(found_inf: Optional[Tensor]) -> bool:
    """Reference path only (it may synchronize): whether AMP found an inf/NaN, so the step is skipped."""
    return found_inf is not None and bool(found_inf.item() != 0)


def _unscale(grads: list[Tensor], grad_scale: Optional[Tensor]) -> None:
    if grad_scale is not None:
        for g in grads:
            g.div_(grad_scale.to(g.device))


@torch.library.custom_op(
    "dlkernels::adam_step",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One Adam (``decoupled_weight_decay=False``) or AdamW step over ``params``; ``steps`` are incremented.

    ``lr_tensor``, when given, is the learning rate (read on device) and ``lr`` is ignored. ``max_exp_avg_sqs`` is
    empty unless ``amsgrad``.
    """
    if not params:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    impl = _choose("adam", lists, steps)
    if impl != "cuda":  # the CUDA binding checks the same in C++
        _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad)
    _check_scalars("adam_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    hyper = (lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
             found_inf)
    if impl == "reference":  # torch's own loop, duplicates included
        adam_reference(*lists, steps, *hyper)
        return
    for indices in _rounds(params):
        args = (*_pick(lists + [steps], indices), *hyper)
        if impl == "cuda":
            _run_cuda("adam_step", args, params[0].device)
        else:
            from ..kernels import optim as kernels

            kernels.adam_step(*args)


def _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad) -> None:
    state = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    if amsgrad:
        state["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_lists("adam_step", params, **state)


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps, weight_decay,
      amsgrad, maximize, decoupled_weight_decay, grad_scale=None, found_inf=None):
    # Also the kernel for real tensors on the meta device: a meta argument mixed with real ones must not pass silently.
    if params:
        _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad)
        _check_scalars("adam_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
                   weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
    """torch's own single-tensor Adam/AdamW, with the AMP semantics of its fused kernel."""
    if _skipped(found_inf):
        return
    _unscale(grads, grad_scale)
    torch_adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        foreach=False, capturable=False, differentiable=False, fused=False,
        has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=float(lr_tensor) if lr_tensor is not None else lr,
        weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


@torch.library.custom_op("dlkernels::sgd_step", mutates_args=("params", "grads", "momentum_buffers"))
def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    first_step: bool,
    lr: float,
    lr_tensor: Optional[Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One SGD step. ``momentum_buffers`` is empty when ``momentum == 0``; with ``first_step`` the buffers are
    uninitialized and start at the gradient (torch's rule: no dampening on the first step)."""
    if not params:
        return
    lists = [params, grads, momentum_buffers]
    impl = _choose("sgd", lists)
    if impl != "cuda":  # the CUDA binding checks the same in C++
        _check_sgd(params, grads, momentum_buffers)
    _check_scalars("sgd_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    hyper = (first_step, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, grad_scale, found_inf)
    if impl == "reference":  # torch's own loop, duplicates included
        sgd_reference(*lists, *hyper)
        return
    for indices in _rounds(params):
        args = (*_pick(lists, indices), *hyper)
        if impl == "cuda":
            _run_cuda("sgd_step", args, params[0].device)
        else:
            from ..kernels import optim as kernels

            kernels.sgd_step(*args)


def _check_sgd(params, grads, momentum_buffers) -> None:
    state = {"grads": grads}
    if momentum_buffers:
        state["momentum_buffers"] = momentum_buffers
    _check_lists("sgd_step", params, **state)


@sgd_step.register_fake
def _(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
      maximize, grad_scale=None, found_inf=None):
    if params:  # see adam_step's fake
        _check_sgd(params, grads, momentum_buffers)
        _check_scalars("sgd_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


def sgd_reference(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum, dampening, weight_decay,
                  nesterov, maximize, grad_scale=None, found_inf=None) -> None:
    """torch's own single-tensor SGD, with the AMP semantics of its fused kernel."""
    if _skipped(found_inf):
        return
    _unscale(grads, grad_scale)
    buffers = [None] * len(params) if first_step or not momentum_buffers else list(momentum_buffers)
    torch_sgd(
        params, grads, buffers, has_sparse_grad=False, foreach=False, fused=False,
        weight_decay=weight_decay, momentum=momentum, lr=float(lr_tensor) if lr_tensor is not None else lr,
        dampening=dampening, nesterov=nesterov, maximize=maximize,
    )
    if first_step and momentum_buffers:
        for mine, started in zip(momentum_buffers, buffers):
            mine.copy_(started)


@torch.library.custom_op(
    "dlkernels::swats_step",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "steps", "switch_state"),
)
def swats_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    switch_state: Tensor,
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One SWATS step over one parameter group (Keskar & Socher 2017, Algorithm 1).

    While ``switch_state[SWATS_PHASE] == 0``: Adam, ``p = -lr sqrt(1-beta2^k)/(1-beta1^k) m/(sqrt(v)+eps)``; then,
    over the whole group, ``gamma = p.p / -p.g`` (when ``p.g != 0``), ``lambda = beta2 lambda + (1-beta2) gamma`` and,
    from the group's second step on, a switch to SGD once ``|lambda/(1-beta2^k) - gamma| < eps`` at the rate
    ``lambda/(1-beta2^k)``. Then: ``v = beta1 v + g``, ``w -= (1-beta1) rate v``. All on device.
    """
    if not params:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, momentum_buffers]
    impl = _choose("swats", lists, steps)
    if impl != "cuda":  # the CUDA binding checks the same in C++
        _check_lists("swats_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                     momentum_buffers=momentum_buffers, steps=steps)
    _check_swats_state(params, switch_state)
    _check_scalars("swats_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    hyper = (lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    if impl == "reference":  # a sequential loop: duplicates are updated in turn
        swats_reference(*lists, steps, switch_state, *hyper)
        return
    rounds = _rounds(params)
    for k, indices in enumerate(rounds):
        args = (*_pick(lists + [steps], indices), switch_state, *hyper)
        finalize = k == len(rounds) - 1  # the switch estimate is updated once, after the group's last round
        if impl == "cuda":
            _run_cuda("swats_step", (*args, finalize), params[0].device)
        else:
            from ..kernels import optim as kernels

            kernels.swats_step(*args, finalize=finalize)


def _check_swats_state(params: list[Tensor], switch_state: Tensor) -> None:
    if switch_state.shape != (SWATS_STATE_SIZE,) or switch_state.dtype != torch.float64:
        raise ValueError(f"dlkernels.swats_step: switch_state must be a float64 tensor of shape ({SWATS_STATE_SIZE},),"
                         f" got {switch_state.dtype} {tuple(switch_state.shape)}")
    if switch_state.device != params[0].device:
        raise ValueError(f"dlkernels.swats_step: switch_state is on {switch_state.device}, params on "
                         f"{params[0].device}")


@swats_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, momentum_buffers, steps, switch_state, lr, lr_tensor, beta1, beta2, eps,
      weight_decay, grad_scale=None, found_inf=None):
    if params:  # see adam_step's fake
        _check_lists("swats_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                     momentum_buffers=momentum_buffers, steps=steps)
        _check_swats_state(params, switch_state)
        _check_scalars("swats_step", params, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


def swats_reference(params, grads, exp_avgs, exp_avg_sqs, momentum_buffers, steps, switch_state, lr, lr_tensor,
                    beta1, beta2, eps, weight_decay, grad_scale=None, found_inf=None) -> None:
    """SWATS in eager PyTorch, without host synchronization: both phases computed, the live one kept."""
    if _skipped(found_inf):
        return
    _unscale(grads, grad_scale)
    in_sgd_phase = switch_state[SWATS_PHASE] != 0
    lr = lr_tensor.double() if lr_tensor is not None else lr
    sum_pg = torch.zeros((), dtype=torch.float64, device=switch_state.device)
    sum_pp = torch.zeros_like(sum_pg)
    for i, param in enumerate(params):
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32  # the kernels' fp32 otherwise
        steps[i] += 1
        step = steps[i].double()
        grad = grads[i].to(compute)
        if weight_decay != 0:  # as torch: no term at all without decay (a -inf param stays -inf)
            grad = grad + weight_decay * param.to(compute)
        exp_avg = exp_avgs[i].to(compute) * beta1 + (1 - beta1) * grad
        exp_avg_sq = exp_avg_sqs[i].to(compute) * beta2 + (1 - beta2) * grad * grad
        step_size = (lr * (1 - beta2**step).sqrt() / (1 - beta1**step)).to(compute)
        adam_update = -step_size * exp_avg / (exp_avg_sq.sqrt() + eps)
        sum_pg += (adam_update * grad).sum(dtype=torch.float64)
        sum_pp += (adam_update * adam_update).sum(dtype=torch.float64)
        buffer = momentum_buffers[i].to(compute) * beta1 + grad
        sgd_update = -((1 - beta1) * switch_state[SWATS_SGD_LR]).to(compute) * buffer
        exp_avgs[i].copy_(torch.where(in_sgd_phase, exp_avgs[i].to(compute), exp_avg))
        exp_avg_sqs[i].copy_(torch.where(in_sgd_phase, exp_avg_sqs[i].to(compute), exp_avg_sq))
        momentum_buffers[i].copy_(torch.where(in_sgd_phase, buffer, momentum_buffers[i].to(compute)))
        param.copy_(param.to(compute) + torch.where(in_sgd_phase, sgd_update, adam_update))
    group_step = switch_state[SWATS_STEP] + 1
    estimating = (~in_sgd_phase) & (sum_pg != 0)
    gamma = sum_pp / torch.where(sum_pg != 0, -sum_pg, 1.0)
    ema = torch.where(estimating, beta2 * switch_state[SWATS_LAMBDA] + (1 - beta2) * gamma, switch_state[SWATS_LAMBDA])
    corrected = ema / (1 - beta2**group_step)
    switch = estimating & (group_step > 1) & ((corrected - gamma).abs() < eps)
    switch_state[SWATS_PHASE] = (in_sgd_phase | switch).double()
    switch_state[SWATS_LAMBDA] = ema
    switch_state[SWATS_SGD_LR] = torch.where(switch, corrected, switch_state[SWATS_SGD_LR])
    switch_state[SWATS_STEP] = group_step
