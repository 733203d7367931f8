"""``dlkernels.optim.SGD``: drop-in for ``torch.optim.SGD`` (momentum, dampening, Nesterov) on ``dlkernels.ops``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.optim import sgd_step
from ._fused import FusedOptimizer, check_lr, check_nonnegative, local_shards


class SGD(FusedOptimizer):
    """SGD with torch's arguments, defaults and state (``momentum_buffer`` when ``momentum != 0``).

    ``foreach`` and ``fused`` are accepted and ignored: every step is one fused update per param group.
    """

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
        check_lr(lr)
        check_nonnegative("momentum", momentum)
        check_nonnegative("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("SGD does not support differentiable=True")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": False,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _step_group(self, group, params, grad_scale, found_inf) -> None:
        lr, lr_tensor = self._lr(group)
        hyper = (
            lr, lr_tensor, float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            group["nesterov"], group["maximize"], grad_scale, found_inf,
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
