"""``dlkernels.optim.SGD``: drop-in for ``torch.optim.SGD`` (momentum, dampening, Nesterov) on ``dlkernels.ops``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torch.optim.sgd import sgd as torch_sgd

from ..ops.optim import _skipped, _unscale, sgd_step
from ._fused import FusedOptimizer, check_fused_flags, local_shards


def check_sgd_args(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's constructor checks, in its order."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(FusedOptimizer):
    """SGD with torch's arguments, defaults, checks and state (``momentum_buffer`` when ``momentum != 0``).

    ``foreach`` and ``fused`` are accepted, checked as torch checks them and kept, but change nothing: every step is
    one fused update per param group. ``lr``, ``momentum``, ``dampening`` and ``weight_decay`` may be tensors, as in
    torch (all but ``lr`` are read on the host at each step). A group with sparse gradients takes torch's own
    for-loop SGD (with AMP's unscale and skip applied first). Refused: ``differentiable=True`` and complex params
    (use ``torch.optim.SGD``). NaN/Inf propagate as in torch's for-loop SGD.
    """

    _supports_sparse_grads = True
    _required_group_keys = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        check_sgd_args(lr, momentum, dampening, weight_decay, nesterov)
        check_fused_flags(fused, foreach, differentiable)
        if differentiable:
            raise ValueError("dlkernels.optim.SGD does not support differentiable=True (use torch.optim.SGD)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def check_hyperparameters(self, group) -> None:
        check_sgd_args(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                       group.get("nesterov", False))
        if group.get("differentiable"):
            raise ValueError("dlkernels.optim.SGD does not support differentiable=True")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _step_group(self, group, params, grad_scale, found_inf) -> None:
        if any(p.grad.is_sparse for p in params):
            self._step_group_sparse(group, params, grad_scale, found_inf)
            return
        lr, lr_tensor = self._lr(group)
        hyper = (
            lr, lr_tensor, float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group["maximize"]), grad_scale, found_inf,
        )
        if group["momentum"] == 0:
            sgd_step(local_shards(params), local_shards([p.grad for p in params]), [], False, *hyper)
            return
        # Params without a buffer start it at their gradient (torch's rule), apart from those that have one.
        continuing = [p for p in params if self.state[p].get("momentum_buffer") is not None]
        starting = [p for p in params if self.state[p].get("momentum_buffer") is None]
        for p in starting:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for subset, first_step in ((continuing, False), (starting, True)):
            if subset:
                buffers = [self.state[p]["momentum_buffer"] for p in subset]
                sgd_step(*map(local_shards, (subset, [p.grad for p in subset], buffers)), first_step, *hyper)

    def _step_group_sparse(self, group, params, grad_scale, found_inf) -> None:
        """torch's for-loop SGD, which takes sparse gradients, after AMP's skip and unscale."""
        if _skipped(found_inf):
            return
        grads = [p.grad for p in params]
        _unscale(grads, grad_scale)
        has_momentum = group["momentum"] != 0
        buffers = [self.state[p].get("momentum_buffer") for p in params] if has_momentum else []
        torch_sgd(
            params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=True, foreach=False, fused=False,
        )
        if has_momentum:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer
