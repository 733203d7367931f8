"""What the fused optimizers share: param-group checks, AMP hooks for ``torch.amp.GradScaler`` and state dicts that
move both ways between these optimizers and ``torch.optim``'s."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed.tensor: no FSDP2 parameters can exist
        return None
    return DTensor


def local_shards(tensors: list) -> list:
    """This rank's shards of DTensor (FSDP2 ``fully_shard``) tensors, the others as they are: the fused update is
    elementwise, so stepping each rank's shard of a parameter, gradient and state is stepping the whole."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def check_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_betas(betas) -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_nonnegative(name: str, value) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name} value: {value}")


class FusedOptimizer(Optimizer):
    """Base of the dlkernels optimizers: a ``torch.optim.Optimizer`` whose ``step`` runs one fused op per group.

    ``step`` reads ``self.grad_scale`` / ``self.found_inf`` when ``torch.amp.GradScaler`` sets them (the kernels
    unscale the gradients and skip the step on inf/NaN without a host sync). ``state_dict()`` returns the live state
    tensors, as torch's does; ``load_state_dict`` copies what it loads, so an optimizer loading another's live state
    (ours or torch's) never shares buffers with it; step counts are kept as float32 scalars on the parameter's device.
    """

    _step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        devices = set()
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__}: params must be floating point tensors, got {p.dtype} in param group {index}"
                )
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__}: all params of a param group must be on one device, param group {index} has "
                f"params on {sorted(str(d) for d in devices)}"
            )
        self._init_param_group(group)

    def _init_param_group(self, group: dict[str, Any]) -> None:
        """Per-group setup after checks (SWATS: its device state)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            self._check_sharding(params)
            device = params[0].device
            self._step_group(
                group,
                params,
                _on(grad_scale, device),
                _on(found_inf, device),
            )
        return loss

    # Whether an update of each element reads only that element (then DTensor shards step independently).
    _elementwise = True

    def _check_sharding(self, params) -> None:
        dtensor = _dtensor_class()
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            return
        if not self._elementwise:
            raise NotImplementedError(
                f"{type(self).__name__} cannot step DTensor (FSDP2 fully_shard) parameters: its update reduces "
                "over whole parameters, which each rank holds only a shard of"
            )
        for p in params:
            if not isinstance(p.grad, dtensor) or p.grad.placements != p.placements:
                raise RuntimeError(f"{type(self).__name__}: a DTensor parameter needs a gradient with the same "
                                   f"placements, got {getattr(p.grad, 'placements', type(p.grad).__name__)} for "
                                   f"{p.placements}")

    def _step_group(self, group, params, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    @staticmethod
    def _lr(group) -> tuple[float, Optional[Tensor]]:
        """(lr as a float, lr as a 1-element tensor on the params' device or None): the kernels read the tensor."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            device = group["params"][0].device
            return 0.0, lr.detach().reshape(()).to(device, non_blocking=True)
        return float(lr), None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(copy.deepcopy(state_dict))
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.as_tensor(state["step"]).to(device=p.device, dtype=torch.float32)
            if group["params"]:
                self._init_param_group(group)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.reshape(()).to(device, non_blocking=True)
