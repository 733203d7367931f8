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


# LSTM engine table. PREDICTIONS, not measurements: no GPU has timed these engines yet (bench/NOTES.md, "LSTM",
# gives the reasoning; bench/bench_lstm.py measures them). H200, µs per step of one layer-direction:
#   persistent (csrc/lstm, one launch per sequence, one grid barrier per step): forward ~3-7 for every benchmarked
#     shape; backward ~8 at B64 H512 but growing with the G-way broadcast of a B x 4H gradient, B * H^2 * s bytes of
#     L2 traffic per step (s = bytes per element), past cuDNN's ~28 µs/step backward near B * H^2 * s = 3e8 bytes
#     (bf16 H=1024: B ~150)
#   per_step (torch GEMM + Triton cell per step): host-bound, ~20-30 fwd and ~45-60 fwd+bwd, i.e. not faster than
#     cuDNN anywhere
#   cudnn (torch.nn.LSTM): ~20 fwd, ~43-48 fwd+bwd (anchors)
# So on CUDA: the persistent kernel wherever it takes the shape (and, for training, while its backward is predicted
# faster), else torch's own LSTM when the caller can run it (the modules), else the per-step engine. On the CPU
# (Triton's interpreter) only the per-step engine runs.
_PERSISTENT_BACKWARD_MAX_BYTES = 3e8


def lstm_engine(device_type: str, dtype, steps: int, batch: int, hidden: int, proj: bool, *,
                persistent_ok: bool, training: bool = False, torch_path: bool = False) -> str:
    """``"persistent"``, ``"per_step"`` or ``"cudnn"`` for one layer-direction of T=``steps``, B=``batch``,
    H=``hidden`` (``proj``: proj_size > 0, which only the per-step engine and cuDNN take). ``persistent_ok``: the
    persistent kernel is built and takes this shape; ``training``: a backward will follow; ``torch_path``: the
    caller can run torch's LSTM instead."""
    if device_type != "cuda":
        return "per_step"
    element = torch.empty(0, dtype=dtype).element_size()
    backward_fast = batch * hidden * hidden * element < _PERSISTENT_BACKWARD_MAX_BYTES
    if persistent_ok and not proj and (backward_fast or not training or not torch_path):
        return "persistent"
    return "cudnn" if torch_path else "per_step"


def lstm_cell_blocks(batch: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, num_warps) of the fused LSTM cell kernels: up to 128 hidden units by enough rows for about
    1024 cells per program (each cell reads 4 gates), so a step of B=64, H=1024 is 64 programs."""
    block_h = min(next_pow2(hidden), 128)
    block_b = min(next_pow2(batch), max(1, 1024 // block_h))
    return block_b, block_h, num_warps_for(4 * block_b * block_h)


# conv2d (dlkernels/kernels/conv.py): implicit-GEMM tiles, chosen from sm_90 compiles (bench/NOTES.md).


def conv_flat_k(c: int) -> bool:
    """Flattened (kh, kw, c) reduction when C is not a multiple of 16 (C = 1, 3: one dot covers several taps)."""
    return c % 16 != 0


def conv_gemm_config(device, m: int, c: int, co: int, dtype: torch.dtype, pooled: bool = False) -> dict:
    """Tile sizes of the forward (and dgrad, with C and CO swapped): GPU tiles of 128 pixels x up to 128 channels.
    A pooled forward holds three fp32/int32 tiles (conv tile, running max or sum, window code): at most 64
    channels and 8 warps, so that they fit in registers (ptxas: no spills; bench/NOTES.md)."""
    if gpu_launch_config(device):
        block_m = 128 if m >= 4096 else 64
        block_n = max(16, min(64 if pooled else 128, next_pow2(co)))
        block_k = 32 if dtype == torch.float32 else 64
        if conv_flat_k(c):
            block_k = 16 if dtype == torch.float32 else 32
        else:
            block_k = min(block_k, max(16, next_pow2(c)))
        # 8 warps also for the flattened K, whose 2-D gather addresses take as many registers as a tile, and for
        # 64-row tiles of 128 channels (a strided dgrad spilled 1 KB on 4).
        big = block_m * block_n >= (128 * 64 if pooled or block_m < 128 else 128 * 128)
        warps = 8 if big or (conv_flat_k(c) and block_m >= 128) else 4
        stages = 2 if dtype == torch.float32 and conv_flat_k(c) else 3  # fp32 gathers spill with 3 stages (AlexNet)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    # Interpreter: few, large programs (its cost is per operation, not per element).
    return dict(BLOCK_M=max(16, min(256, next_pow2(m))), BLOCK_N=max(16, min(64, next_pow2(co))),
                BLOCK_K=64 if conv_flat_k(c) else max(16, min(32, next_pow2(c))))


def conv_wgrad_config(device, co: int, c: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the weight-gradient GEMM: output channels x (taps x input channels), pixels reduced."""
    if gpu_launch_config(device):
        block_n = 32 if conv_flat_k(c) else max(16, min(128, next_pow2(c)))
        block_m = max(16, min(128, next_pow2(co)))
        # As the forward: 8 warps for the flattened K's 2-D gather addresses (C_in = 1 spilled 2 KB on 4).
        warps = 8 if block_m * block_n >= 128 * 128 or (conv_flat_k(c) and block_m >= 128) else 4
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32 if dtype == torch.float32 else 64,
                    num_warps=warps, num_stages=3)
    return dict(BLOCK_M=max(16, min(64, next_pow2(co))),
                BLOCK_N=64 if conv_flat_k(c) else max(16, min(32, next_pow2(c))), BLOCK_K=256)


def conv_route_config(device, m: int, co: int) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) of conv2d's backward routing pass (rows of conv output pixels x channels):
    at most 128 rows on the GPU (larger tiles spill their 64-bit gather addresses)."""
    block_n = max(16, min(64, next_pow2(co)))
    if gpu_launch_config(device):
        return max(16, min(4096 // block_n, 128, next_pow2(m))), block_n, {"num_warps": 4}
    return max(16, min(256, next_pow2(m))), block_n, {}
