"""Shared helpers for tests and the CPU correctness table: seeded input makers and the one tolerance rule.

The rule: a kernel's error against a float64 reference may be at most ``factor`` (about 2) times eager PyTorch's own
error in the same dtype, plus a floor of two units in the last place of the dtype at the reference's scale.

Outputs that are sums of ``terms`` products (weight gradients, statistics) get one more floor term,
``sqrt(terms)`` fp32 units in the last place: our kernels accumulate in fp32 as the GPU libraries do, while eager
PyTorch on the CPU accumulates float32 reductions in double, which would otherwise make its error an unfair bar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def make_input(
    shape,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    *,
    seed: int = 0,
    mean: float = 0.0,
    std: float = 1.0,
    requires_grad: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Seeded normal values (never zeros), drawn in float64 on the CPU so every device and dtype sees the same data."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def floor(dtype: torch.dtype) -> float:
    """Two units in the last place at 1.0: the least error any kernel storing ``dtype`` can promise."""
    return 2.0 * torch.finfo(dtype).eps


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    if actual.shape != reference.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    diff = (actual.detach().double().cpu() - reference.detach().double().cpu()).abs()
    return float("inf") if diff.isnan().any() else float(diff.max()) if diff.numel() else 0.0


@dataclass
class Comparison:
    name: str
    dtype: torch.dtype
    error: float
    eager_error: float
    budget: float

    @property
    def ok(self) -> bool:
        return self.error <= self.budget

    @property
    def ratio(self) -> float:
        """Kernel error over eager error (how many times eager PyTorch's error we make)."""
        return self.error / self.eager_error if self.eager_error > 0 else (0.0 if self.error == 0 else float("inf"))

    def __str__(self) -> str:
        return (
            f"{self.name} [{str(self.dtype).replace('torch.', '')}]: error {self.error:.3g} vs eager {self.eager_error:.3g}"
            f" (budget {self.budget:.3g})"
        )


def compare(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor,
    *,
    factor: float = 2.0,
    terms: int = 1,
) -> Comparison:
    """Measures ``actual`` and ``eager`` (same dtype) against a float64 ``reference`` and sets the error budget.

    ``terms``: how many products each output element sums (see the module docstring); 1 for elementwise outputs.
    """
    scale = max(1.0, float(reference.detach().abs().max())) if reference.numel() else 1.0
    eager_error = max_abs_error(eager, reference)
    accumulation = torch.finfo(torch.float32).eps * math.sqrt(terms) if terms > 1 else 0.0
    budget = factor * eager_error + (floor(actual.dtype) + accumulation) * scale
    return Comparison(name, actual.dtype, max_abs_error(actual, reference), eager_error, budget)


def assert_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor,
    *,
    factor: float = 2.0,
    terms: int = 1,
    name: str = "output",
) -> Comparison:
    """Fails unless ``actual`` is within ``factor`` times eager PyTorch's error of the float64 ``reference``."""
    result = compare(name, actual, reference, eager, factor=factor, terms=terms)
    assert result.ok, f"{result} exceeds {factor}x eager error"
    return result
