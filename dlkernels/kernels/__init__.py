"""Triton kernels and their launchers, one module per op. Imported lazily by ``dlkernels.ops`` so that
``import dlkernels`` works without triton and so ``TRITON_INTERPRET`` can be set before triton is imported."""
