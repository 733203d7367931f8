"""``dlkernels.optim.SWATS``: Adam that switches to SGD with momentum (Keskar & Socher 2017), decided on device."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.optim import SWATS_PHASE, SWATS_SGD_LR, SWATS_STATE_SIZE, swats_step
from ._fused import FusedOptimizer, check_adam_args


class SWATS(FusedOptimizer):
    """SWATS, "Improving Generalization Performance by Switching from Adam to SGD" (Algorithm 1).

    Each param group runs Adam while estimating the SGD learning rate from the projection of the Adam step on the
    gradient (a bias-corrected EMA with ``betas[1]``); once the estimate settles (``|lambda - gamma| < eps``), that
    group switches to SGD with momentum ``betas[0]`` at the estimated rate. The estimate and the switch live in
    ``group["switch_state"]`` on the device (see ``dlkernels.ops.optim.swats_step``), so a step never synchronizes;
    ``in_sgd_phase()`` and ``sgd_lr()`` read them (those do synchronize). Per-param state: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``. ``eps`` (default 1e-9, the paper's) serves both Adam and the switch test.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-9,
        weight_decay: float = 0,
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        betas = check_adam_args(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "foreach": foreach,
                    "fused": fused}
        super().__init__(params, defaults)

    _sparse_name = "SWATS"
    _elementwise = False  # the switch test sums over every element of the group
    _required_group_keys = ("lr", "betas", "eps", "weight_decay")
    _required_state_keys = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")

    def check_hyperparameters(self, group) -> None:
        check_adam_args(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _init_param_group(self, group) -> None:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        state = group.get("switch_state")
        if state is None:
            group["switch_state"] = torch.zeros(SWATS_STATE_SIZE, dtype=torch.float64, device=device)
        else:
            group["switch_state"] = torch.as_tensor(state).to(device=device, dtype=torch.float64)

    def in_sgd_phase(self) -> list[bool]:
        """Per param group: whether it has switched to SGD."""
        return [bool(g["switch_state"][SWATS_PHASE] != 0) for g in self.param_groups]

    def sgd_lr(self) -> list[float]:
        """Per param group: the SGD learning rate chosen at the switch (0 before it)."""
        return [float(g["switch_state"][SWATS_SGD_LR]) for g in self.param_groups]

    def _step_group(self, group, params, grad_scale, found_inf) -> None:
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        lr, lr_tensor = self._lr(group)
        beta1, beta2 = group["betas"]
        swats_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["momentum_buffer"] for s in states], [s["step"] for s in states], group["switch_state"],
            lr, lr_tensor, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            grad_scale, found_inf,
        )
