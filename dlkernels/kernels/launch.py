"""Launch heuristics shared by every Triton kernel: block sizes and warp counts in one place."""
from __future__ import annotations

import os

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def block_for(n: int, max_block: int = 1024, min_block: int = 16, max_waste: float = 0.07) -> int:
    """Power-of-two block for looping over ``n`` elements: the largest one up to ``max_block`` whose padding wastes at
    most ``max_waste`` of the loads (3136 = 56*56 gets 256, not 1024 with 31% wasted), else the least wasteful."""
    candidates = [b for b in (2**i for i in range(4, 11)) if min_block <= b <= max(max_block, min_block)]
    waste = {b: triton.cdiv(n, b) * b / n - 1.0 for b in candidates}
    good = [b for b in candidates if waste[b] <= max_waste and b <= next_pow2(n)]
    return max(good) if good else min(candidates, key=lambda b: (waste[b], -b))


def num_warps_for(block_elems: int) -> int:
    """Warps for a block of ``block_elems`` elements: enough threads for 8-16 elements each, 1 to 16 warps."""
    return max(1, min(16, next_pow2(block_elems // 512)))


def gpu_launch_config(device: torch.device) -> bool:
    """Whether to pick the GPU's block sizes: on CUDA devices, and under the interpreter when
    ``DLKERNELS_GPU_LAUNCH_CONFIG=1`` (tests/test_gpu_compile.py records those launches to compile them for sm_90)."""
    return device.type == "cuda" or os.environ.get("DLKERNELS_GPU_LAUNCH_CONFIG") == "1"


GPU_SM_COUNT = 132  # H100 SXM / H200: the grids the GPU launch configuration is recorded with


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; on CPU a fixed 8 under the interpreter (small grids), or an H100/H200's
    132 with the GPU launch configuration (so recorded launches have the GPU's grids)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return GPU_SM_COUNT if gpu_launch_config(device) else 8


def resident_programs(num_warps: int, registers: int) -> int:
    """Programs of ``num_warps`` warps using ``registers`` per thread that one SM of sm_80/sm_90 holds at once:
    64K registers (allocated per warp in units of 256), 64 warps, 32 programs (no shared memory assumed)."""
    per_warp = triton.cdiv(max(1, registers) * 32, 256) * 256
    return max(1, min(32, 64 // num_warps, 65536 // (per_warp * num_warps)))


def splits_in_waves(units: int, programs_per_split: int, slots: int, max_waves: int = 8) -> int:
    """How many splits ``s`` to cut ``units`` equal work units into, when each split is ``programs_per_split``
    programs and ``slots`` programs run at once: the ``s`` minimizing waves x units per program,
    ``ceil(s * programs_per_split / slots) * ceil(units / s)``, fewest splits among ties (fewer partial results).
    A grid of 576 programs on 528 slots (a second wave of 48) loses to 512 programs in one wave."""
    best = None
    for waves in range(1, max_waves + 1):
        s = max(1, min(units, waves * slots // max(1, programs_per_split)))
        cost = (triton.cdiv(s * programs_per_split, slots) * triton.cdiv(units, s), s)
        best = cost if best is None or cost < best else best
    return best[1]
