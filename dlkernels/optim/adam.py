"""``dlkernels.optim.Adam`` and ``AdamW``: drop-ins for ``torch.optim.Adam`` / ``AdamW`` on ``dlkernels.ops.adam_step``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.optim import adam_step
from ._fused import FusedOptimizer, check_adam_args, check_fused_flags, local_shards


class Adam(FusedOptimizer):
    """Adam (``decoupled_weight_decay=True``: AdamW) with torch's arguments, defaults, checks and state.

    ``foreach``, ``fused`` and ``capturable`` are accepted, checked as torch checks them and kept in the param groups,
    but change nothing: every step is one fused update per param group that reads step counts, a tensor ``lr`` and
    AMP's ``grad_scale`` / ``found_inf`` on the device (so it is always capturable). ``lr``, ``betas`` (both), ``eps``
    and ``weight_decay`` may be 1-element tensors, as in torch; tensor betas, eps and weight decay are read on the
    host at each step. Refused: ``differentiable=True`` and complex params (use ``torch.optim.Adam`` for those).
    NaN/Inf propagate as in torch's for-loop Adam.
    """

    _required_group_keys = ("lr", "betas", "eps", "weight_decay")
    _required_state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        betas = check_adam_args(lr, betas, eps, weight_decay, foreach, capturable)
        check_fused_flags(fused, foreach, differentiable)
        if differentiable:
            raise ValueError(f"dlkernels.optim.{type(self).__name__} does not support differentiable=True "
                             f"(use torch.optim.{type(self).__name__})")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def check_hyperparameters(self, group) -> None:
        check_adam_args(group["lr"], group["betas"], group["eps"], group["weight_decay"], group.get("foreach"),
                        group.get("capturable", False))
        if group.get("differentiable"):
            raise ValueError(f"dlkernels.optim.{type(self).__name__} does not support differentiable=True")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)

    def _step_group(self, group, params, grad_scale, found_inf) -> None:
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        lr, lr_tensor = self._lr(group)
        beta1, beta2 = group["betas"]
        adam_step(
            *map(local_shards, (params, [p.grad for p in params], exp_avgs, exp_avg_sqs, max_exp_avg_sqs)), steps,
            lr, lr_tensor, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]), grad_scale,
            found_inf,
        )


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (default 1e-2), as ``torch.optim.AdamW``."""

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
