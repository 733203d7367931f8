"""``dlkernels.optim.from_torch(optimizer)``: the fused optimizer equivalent to a ``torch.optim`` one."""
from __future__ import annotations

import inspect

import torch

from ._fused import FusedOptimizer
from .adam import Adam, AdamW
from .sgd import SGD

_FUSED = {torch.optim.Adam: Adam, torch.optim.AdamW: AdamW, torch.optim.SGD: SGD}


def from_torch(optimizer: torch.optim.Optimizer) -> FusedOptimizer:
    """Returns the dlkernels optimizer for ``optimizer`` (``torch.optim.Adam``, ``AdamW`` or ``SGD``) with the same
    defaults, the same param groups (the same parameter objects and every group option, including keys added by
    learning-rate schedulers such as ``initial_lr``) and the same state.

    The state tensors (moments, momentum buffers) are shared, not copied: keep stepping only the returned
    optimizer. Step counts become the float32 device tensors the fused kernels read. A scheduler made for
    ``optimizer`` keeps pointing at it: make schedulers for the returned one. A dlkernels optimizer is returned as is.
    """
    if isinstance(optimizer, FusedOptimizer):
        return optimizer
    cls = _FUSED.get(type(optimizer))
    if cls is None:
        supported = ", ".join(f"torch.optim.{c.__name__}" for c in _FUSED)
        raise TypeError(f"from_torch: no fused optimizer for {type(optimizer).__module__}."
                        f"{type(optimizer).__qualname__} (supported: {supported})")
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    groups = [{k: v for k, v in group.items() if k in accepted or k not in optimizer.defaults}
              for group in optimizer.param_groups]
    fused = cls(groups, **defaults)
    for p, state in optimizer.state.items():
        moved = dict(state)
        if "step" in moved:
            moved["step"] = torch.as_tensor(moved["step"]).to(device=p.device, dtype=torch.float32)
        fused.state[p] = moved
    return fused
