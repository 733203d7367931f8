"""Launch heuristics shared by every Triton kernel: block sizes and warp counts in one place."""
from __future__ import annotations

import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def num_warps_for(block_elems: int) -> int:
    """Warps for a block of ``block_elems`` elements: enough threads for 8-16 elements each, 1 to 16 warps."""
    return max(1, min(16, next_pow2(block_elems // 512)))


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 8 on CPU under the interpreter, to keep grids small)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
