"""Autograd-aware custom ops (``torch.library`` namespace ``dlkernels``), each with a reference implementation."""

__all__: list[str] = []
