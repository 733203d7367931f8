"""What the fused optimizers share: argument checks as torch.optim makes them (same order, same exception types),
param-group checks made before anything is registered, AMP hooks for ``torch.amp.GradScaler`` and state dicts that
move both ways between these optimizers and ``torch.optim``'s (and refuse, naming what is missing, another
optimizer's)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _to_scalar


def check_lr(lr, foreach=None, capturable=False) -> None:
    """torch.optim's learning-rate checks (Adam adds the foreach one)."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


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


def check_nonnegative(name: str, value) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name} value: {value}")


def check_adam_args(lr, betas, eps, weight_decay, foreach=None, capturable=False) -> tuple:
    """torch.optim.Adam's constructor checks, in its order and with its exception types (``betas=(0.9,)`` is an
    IndexError there too); returns the betas as torch keeps them (1-element tensors squeezed to 0-d)."""
    check_lr(lr, foreach, capturable)
    check_nonnegative("epsilon", eps)
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    check_nonnegative("weight_decay", weight_decay)
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas[:2]):
        if isinstance(beta, Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    if len(betas) != 2:
        raise ValueError(f"betas must have two values, got {len(betas)}")  # torch would fail later, unpacking
    return tuple(map(_to_scalar, betas))


def check_fused_flags(fused, foreach, differentiable) -> None:
    """torch.optim's checks of ``fused`` (its RuntimeErrors)."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


class FusedOptimizer(Optimizer):
    """Base of the dlkernels optimizers: a ``torch.optim.Optimizer`` whose ``step`` runs one fused op per group.

    ``step`` reads ``self.grad_scale`` / ``self.found_inf`` when ``torch.amp.GradScaler`` sets them (the kernels
    unscale the gradients and skip the step on inf/NaN without a host sync). ``state_dict()`` returns the live state
    tensors, as torch's does; ``load_state_dict`` copies what it loads, so an optimizer loading another's live state
    (ours or torch's) never shares buffers with it; step counts are kept as float32 scalars on the parameter's device.

    A param group is checked before it is registered (``add_param_group`` with a bad group raises and registers
    nothing): floating-point params on one device and valid hyperparameters, with the constructor's checks (torch
    checks only the constructor's values). A param listed twice in a group is updated twice in a row, as torch does
    (with its warning); a param in two groups is refused, as torch does.
    """

    _step_supports_amp_scaling = True
    _supports_sparse_grads = False
    _sparse_name = "Adam"  # torch.optim.AdamW's message names Adam too
    # Group keys ``step`` needs that __setstate__ does not default (a state dict without them is another optimizer's).
    _required_group_keys: tuple[str, ...] = ("lr",)
    # Per-param state keys a started param must have.
    _required_state_keys: tuple[str, ...] = ()

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raises for invalid hyperparameters in ``group`` (the constructor's checks)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        super().add_param_group(param_group)  # torch's own checks; it appends last, after them
        group = self.param_groups[-1]
        try:
            self._check_group(group, index)
            self._init_param_group(group)
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        name = type(self).__name__
        devices = set()
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(
                    f"{name}: params must be real floating point tensors (complex params: use torch.optim.{name}), "
                    f"got {p.dtype} in param group {index}"
                )
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"{name}: all params of a param group must be on one device, param group {index} has "
                f"params on {sorted(str(d) for d in devices)}"
            )
        self.check_hyperparameters(group)

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
            if not self._supports_sparse_grads and any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{self._sparse_name} does not support sparse gradients, please consider SparseAdam "
                                   f"instead")
            self._check_sharding(params)
            device = params[0].device
            self._step_group(group, params, _on(grad_scale, device), _on(found_inf, device))
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

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses, before anything is loaded, a state dict this optimizer could not step with (another optimizer's:
        torch loads it and fails at ``step`` with a KeyError)."""
        name = type(self).__name__
        for i, group in enumerate(state_dict.get("param_groups", [])):
            missing = [key for key in self._required_group_keys if key not in group]
            if missing:
                raise ValueError(f"{name}.load_state_dict: param group {i} has no {', '.join(map(repr, missing))} "
                                 f"(a state dict of another optimizer?)")
            self.check_hyperparameters({**self.defaults, **group})
        for param_id, state in state_dict.get("state", {}).items():
            missing = [key for key in self._required_state_keys if key not in state]
            if state and missing:
                raise ValueError(f"{name}.load_state_dict: the state of param {param_id} has no "
                                 f"{', '.join(map(repr, missing))} (it has {sorted(state)}: a state dict of another "
                                 f"optimizer?)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_state_dict(state_dict)
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
