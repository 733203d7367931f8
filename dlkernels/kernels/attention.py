"""Flash-attention style attention in Triton, Hopper-shaped: forward, dQ (+ delta) and dK/dV passes, with windows.

Forward: one program per (query block, batch * query head) streams the key blocks that meet the window
``[i - left, i + right]`` of its rows (online softmax in base 2, fp32 accumulators) and stores the output and the
row log-sum-exp (natural log; +inf for rows with no key, so ``exp(s - lse) = 0`` there).

Backward, two passes and no atomics (bitwise deterministic by construction):

1. dQ, query-major: one program per (query block, batch * query head) first computes ``delta = rowsum(dO * O)`` of
   its rows (the softmax-backward row term; stored for pass 2, so there is no separate preprocess launch), then loops
   over the key blocks in the window: ``S = Q K^T``, ``P``, ``dP = dO V^T``, ``dS = P (dP - delta)``,
   ``dQ += dS K``. Every dot has the 128 query rows as its M dimension.
2. dK/dV, key-major: one program per (key block, batch * kv head) keeps K and V, loops over the group's query heads
   and the query blocks in the window and computes the transposed tiles, ``S^T = K Q^T``, ``P^T``,
   ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``: every dot has the 128 keys as its M dimension, so each is
   one warpgroup MMA (wgmma) on sm_90 and P^T, dS^T feed the next dot straight from registers. The group sum of
   GQA is a register accumulation, and key padding only zeroes whole rows of dK/dV at the end (row j of S^T feeds
   only dK[j], dV[j]).

Dropout keeps an element iff ``rand(seed, ((b * Hq + h) * Nq + i) * Nk + j) >= p``, so all passes agree.

Head dims (``DK`` of q and k, ``DV`` of v) are compile-time constants padded to powers of two (``BLOCK_DK``,
``BLOCK_DV``); when a head dim is already a power of two, its loads carry no mask along it. Sequence ends and
windows are masks computed only on boundary blocks: each block loop runs in three phases (masked, unmasked,
masked), the middle one over blocks wholly inside every row's window and the sequence, so dense attention runs one
pipelined loop.

Tile sizes: a short list per head dim (``block_configs``), first entry predicted best from sm_90 compiles (see
bench/NOTES.md); on a GPU each problem class is timed once over the list and the fastest is cached
(``DLKERNELS_ATTENTION_TUNE=0`` keeps the first).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import gpu_launch_config, next_pow2

LOG2E = 1.4426950408889634  # host side only: jit code spells constants out (globals must be constexpr there)


def _cfg(block_m, block_n, warps, stages, **options):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **options)


# Candidate tiles per (pass, head-dim block <=): the first is the default and what the interpreter's GPU-launch mode
# records. Chosen from sm_90 compiles through the JIT's specialization (bench/NOTES.md): every dot a wgmma, no
# spills at the benchmark shapes, the later entries spill-free fallbacks for padded head dims and key padding.
_GPU_CONFIGS = {
    "fwd": {
        # D=64: 118 registers under the 128 cap, so two CTAs share an SM and hide each other's loop-phase bubbles;
        # 64-row blocks (4 CTAs/SM) touch 576 instead of 640 keys per row block in a ±256 window.
        64: [_cfg(128, 64, 8, 3, maxnreg=128), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 3)],
        128: [_cfg(128, 128, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)],
        256: [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)],
    },
    "dq": {
        64: [_cfg(128, 64, 8, 3, maxnreg=128), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
        128: [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 2)],
        256: [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2)],
    },
    "dkdv": {
        64: [_cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 4, 2)],
        128: [_cfg(64, 128, 8, 3), _cfg(32, 128, 8, 2), _cfg(32, 128, 8, 3)],
        256: [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)],  # the least spilling found (88 bytes at 32x64)
    },
}
# With dropout the Philox counters and keep-masks need ~40-60 more registers per thread: smaller tiles.
_GPU_DROPOUT_CONFIGS = {
    "fwd": {64: [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)], 128: [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 3)],
            256: _GPU_CONFIGS["fwd"][256]},
    "dq": {64: [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)], 128: [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)],
           256: _GPU_CONFIGS["dq"][256]},
    "dkdv": {64: [_cfg(16, 128, 8, 3), _cfg(32, 128, 8, 3)], 128: [_cfg(16, 128, 8, 2), _cfg(32, 128, 8, 2)],
             256: _GPU_CONFIGS["dkdv"][256]},
}
_INTERPRETER_CONFIG = _cfg(32, 32, 4, 1)  # small blocks keep the interpreter's per-op numpy work cheap


def block_configs(head_dim_block: int, device: torch.device, kind: str, dropout: bool = False) -> list[dict]:
    """Candidate launch parameters for ``kind`` in {"fwd", "dq", "dkdv"}: BLOCK_M (queries), BLOCK_N (keys), warps,
    stages (and a register cap); ``head_dim_block`` is the larger padded head dim. The first is the default."""
    if not gpu_launch_config(device):
        return [_INTERPRETER_CONFIG]
    by_dim = (_GPU_DROPOUT_CONFIGS if dropout else _GPU_CONFIGS)[kind]
    return by_dim[min(d for d in by_dim if d >= head_dim_block)]


_tuned: dict = {}


def _launch(kernel, kind: str, grid, args: tuple, kwargs: dict, device: torch.device, head_dim_block: int, problem):
    """Launches ``kernel`` with the cached best of ``block_configs`` for this problem class (timed once per class on
    a GPU, so the first call of a class must not be inside CUDA-graph capture; the first candidate elsewhere).
    ``grid(config)`` gives the grid; ``problem`` the class key."""
    configs = block_configs(head_dim_block, device, kind, kwargs["DROPOUT"])
    config = configs[0]
    if device.type == "cuda" and len(configs) > 1 and os.environ.get("DLKERNELS_ATTENTION_TUNE", "1") != "0":
        key = (kind, head_dim_block, problem)
        config = _tuned.get(key)
        if config is None:
            # Each pass writes only its own outputs, so timing repeated launches is side-effect free.
            times = [
                triton.testing.do_bench(lambda c=c: kernel[grid(c)](*args, **kwargs, **c), warmup=5, rep=25)
                for c in configs
            ]
            config = _tuned[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    kernel[grid(config)](*args, **kwargs, **config)


@triton.jit
def _window_ok(qi, kj, LEFT, RIGHT):
    """Query ``qi`` may see key ``kj`` under the window (broadcasting index tensors)."""
    return (kj >= qi - LEFT) & (kj <= qi + RIGHT)


@triton.jit
def _dropout_keep(seed, bh, qi, kj, Nq, Nk, dropout_p):
    """Philox keep-mask at (query ``qi``, key ``kj``) of batch * query head ``bh`` (broadcasting index tensors); the
    one formula every pass shares."""
    offsets = (bh.to(tl.int64) * Nq + qi.to(tl.int64)) * Nk + kj.to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _load_rows(base, rows, row_ok, stride_n, stride_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
               ROW_MASK: tl.constexpr):
    """(len(rows), BLOCK_D) tile; masked along the rows only if ROW_MASK, along D only if D is padded."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    if ROW_MASK:
        if BLOCK_D == D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if BLOCK_D == D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, row_ok, stride_n, value, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    if BLOCK_D == D:
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _phase_bounds(lo, hi, full_lo, full_hi):
    """Splits the block loop [lo, hi) into masked [lo, a), unmasked [a, b), masked [b, hi) (a, b clamped)."""
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return a, b


@triton.jit
def _query_major_bounds(m_start, Nk, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) meeting the window of query rows [m_start, m_start + BLOCK_M), and the sub-range
    [a, b) wholly inside every row's window and inside [0, Nk) (no masks needed there)."""
    lo = tl.maximum(m_start - LEFT, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M + RIGHT, Nk)
    full_lo = tl.cdiv(tl.maximum(m_start + BLOCK_M - 1 - LEFT, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(m_start + RIGHT + 1, Nk) // BLOCK_N * BLOCK_N
    a, b = _phase_bounds(lo, hi, full_lo, full_hi)
    return lo, a, b, hi


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n,
    bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax. MASKED: apply the key-range and window masks (boundary blocks only)."""
    cols = start_n + offs_n
    col_ok = cols < Nk
    k = _load_rows(k_base, cols, col_ok, stride_kn, stride_kd, DK, BLOCK_DK, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where(_window_ok(rows[:, None], cols[None, :], LEFT, RIGHT) & col_ok[None, :], s, float("-inf"))
    if HAS_KPM:
        pad = tl.load(kpm_row + cols.to(tl.int64) * stride_kpm_n, mask=col_ok, other=1)
        s = tl.where(pad[None, :] == 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed so far keeps m = -inf; exponentiate against 0 there to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p), p, 0.0)
    v = _load_rows(v_base, cols, col_ok, stride_vn, stride_vd, DV, BLOCK_DV, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KPM, KPC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpm_b, stride_kpm_n,
    H, GROUP, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Program (query block, batch * query head). Out is contiguous (B, Hq, Nq, DV), Lse (B, Hq, Nq)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    offs_n = tl.arange(0, BLOCK_N)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, DK, BLOCK_DK, True)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_row = KPM + b * stride_kpm_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Only key blocks that meet the window of some row in this block: cost ~ N * (left + right).
    lo, full_lo, full_hi, hi = _query_major_bounds(m_start, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, False, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )

    # Whether a row has any allowed key, from the window and the padding's running count (not from l: a row whose
    # allowed scores are all -inf has l = 0 and gets 0 * inf = NaN, as torch's softmax gives).
    first = tl.maximum(rows - LEFT, 0)
    last = tl.minimum(rows + RIGHT, Nk - 1)
    has_key = first <= last
    if HAS_KPM:  # KPC[b, j] = non-padded keys before j, (B, Nk + 1) contiguous
        kpc_row = KPC + b * (Nk + 1)
        kept = tl.load(kpc_row + last + 1, mask=has_key & row_ok, other=0) - \
            tl.load(kpc_row + first, mask=has_key & row_ok, other=0)
        has_key &= kept > 0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    _store_rows(Out + bh.to(tl.int64) * Nq * DV, rows, row_ok, DV, acc * inv_l[:, None], DV, BLOCK_DV)
    # Natural-log lse: (m + log2 l) * ln 2.
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(Lse + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


@triton.jit
def _dq_block(
    dq, q, do, lse_log2, delta, k_base, v_base, kpm_row, start_n, rows, offs_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n,
    bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ += dS K over one key block. Keys past Nk load as 0, so their dS columns add nothing."""
    cols = start_n + offs_n
    col_ok = cols < Nk
    k = _load_rows(k_base, cols, col_ok, stride_kn, stride_kd, DK, BLOCK_DK, MASKED)
    v = _load_rows(v_base, cols, col_ok, stride_vn, stride_vd, DV, BLOCK_DV, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    # lse of a row with no key is +inf, so its p is exactly 0 (and so is its dS).
    p = tl.math.exp2(s - lse_log2[:, None])
    if MASKED:
        p = tl.where(_window_ok(rows[:, None], cols[None, :], LEFT, RIGHT), p, 0.0)
    if HAS_KPM:
        pad = tl.load(kpm_row + cols.to(tl.int64) * stride_kpm_n, mask=col_ok, other=1)
        p = tl.where(pad[None, :] == 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Out, dOut, Lse, Delta, KPM, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_kpm_b, stride_kpm_n,
    H, GROUP, Nq, Nk, LEFT, RIGHT, scale, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Program (query block, batch * query head): delta = rowsum(dO * O) of its rows (stored to Delta for the dK/dV
    pass) and dQ of its rows (written contiguous), no atomics."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    offs_n = tl.arange(0, BLOCK_N)
    row_base = bh.to(tl.int64) * Nq

    o = _load_rows(Out + b * stride_ob + h * stride_oh, rows, row_ok, stride_om, stride_od, DV, BLOCK_DV, True)
    do = _load_rows(dOut + b * stride_gb + h * stride_gh, rows, row_ok, stride_gm, stride_gd, DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row_base + rows, delta, mask=row_ok)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, stride_qd, DK, BLOCK_DK, True)
    lse_log2 = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_row = KPM + b * stride_kpm_b
    scale_log2 = scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_major_bounds(m_start, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse_log2, delta, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse_log2, delta, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, False, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse_log2, delta, k_base, v_base, kpm_row, start_n, rows, offs_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, DK, DV, BLOCK_DK, BLOCK_DV, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    _store_rows(dQ + row_base * DK, rows, row_ok, DK, dq * scale, DK, BLOCK_DK)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, cols,
    stride_qm, stride_qd, stride_gm, stride_gd,
    bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV (keys x D) += one query block, in transposed (key-major) tiles. Rows past Nq (masked blocks only) load
    q = dO = 0 and lse = +inf, so they add nothing."""
    rows = start_m + offs_m
    row_ok = rows < Nq
    q = _load_rows(q_base, rows, row_ok, stride_qm, stride_qd, DK, BLOCK_DK, MASKED)
    do = _load_rows(do_base, rows, row_ok, stride_gm, stride_gd, DV, BLOCK_DV, MASKED)
    if MASKED:
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    pt = tl.math.exp2(st - (lse * 1.4426950408889634)[None, :])
    if MASKED:
        pt = tl.where(_window_ok(rows[None, :], cols[:, None], LEFT, RIGHT), pt, 0.0)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows[None, :], cols[:, None], Nq, Nk, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        dv += tl.dot(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.where(keep, dpt * inv_keep, 0.0)
    else:
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, KPM, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_kpm_b, stride_kpm_n,
    HKV, GROUP, Nq, Nk, LEFT, RIGHT, scale, dropout_p, seed,
    DK: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Program (key block, batch * kv head): dK, dV of its keys summed over the group's query heads, written
    contiguous (B, Hkv, Nk, DK / DV)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    n_start = pid_n * BLOCK_N
    cols = n_start + tl.arange(0, BLOCK_N)
    col_ok = cols < Nk
    offs_m = tl.arange(0, BLOCK_M)
    k = _load_rows(K + b * stride_kb + hk * stride_kh, cols, col_ok, stride_kn, stride_kd, DK, BLOCK_DK, True)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, cols, col_ok, stride_vn, stride_vd, DV, BLOCK_DV, True)
    scale_log2 = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Query blocks whose window meets these keys: rows in [n_start - RIGHT, n_start + BLOCK_N - 1 + LEFT]; those
    # whose every row sees every key of the block and lies below Nq, [full_lo, full_hi), skip the masks. Keys past
    # Nk need no mask: their rows of dK/dV are never stored.
    lo = tl.maximum(n_start - RIGHT, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(n_start + BLOCK_N + LEFT, Nq)
    full_lo = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - RIGHT, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.minimum(n_start + LEFT + 1, Nq) // BLOCK_M * BLOCK_M
    full_lo, full_hi = _phase_bounds(lo, hi, full_lo, full_hi)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * (HKV * GROUP) + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_gb + h * stride_gh
        lse_base = Lse + bh * Nq
        delta_base = Delta + bh * Nq
        for start_m in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, cols,
                stride_qm, stride_qd, stride_gm, stride_gd, bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
                DK, DV, BLOCK_DK, BLOCK_DV, True, DROPOUT, DOT_PRECISION,
            )
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, cols,
                stride_qm, stride_qd, stride_gm, stride_gd, bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
                DK, DV, BLOCK_DK, BLOCK_DV, False, DROPOUT, DOT_PRECISION,
            )
        for start_m in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, cols,
                stride_qm, stride_qd, stride_gm, stride_gd, bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
                DK, DV, BLOCK_DK, BLOCK_DV, True, DROPOUT, DOT_PRECISION,
            )

    dk = dk * scale
    if HAS_KPM:  # a padded key gets no probability from any query: its rows of dK and dV are zero
        pad = tl.load(KPM + b * stride_kpm_b + cols.to(tl.int64) * stride_kpm_n, mask=col_ok, other=1)
        dk = tl.where(pad[:, None] == 0, dk, 0.0)
        dv = tl.where(pad[:, None] == 0, dv, 0.0)
    kv_row = bhk.to(tl.int64) * Nk
    _store_rows(dK + kv_row * DK, cols, col_ok, DK, dk, DK, BLOCK_DK)
    _store_rows(dV + kv_row * DV, cols, col_ok, DV, dv, DV, BLOCK_DV)


@triton.jit
def _dropout_mask_kernel(Keep, Nq, Nk, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use, materialized (B * Hq, Nq, Nk) for tests and debugging."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
    offs = (bh.to(tl.int64) * Nq + rows.to(tl.int64))[:, None] * Nk + cols[None, :]
    tl.store(Keep + offs, keep.to(tl.int8), mask=(rows[:, None] < Nq) & (cols[None, :] < Nk))


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 operands (bf16 copied for the interpreter) use full-precision dots; None (Triton's default) for
    # fp16/bf16, where the option does not apply.
    return "ieee" if dtype == torch.float32 else None


def _window_bounds(left: int, right: int, nq: int, nk: int) -> tuple[int, int]:
    """Unbounded (-1) or oversized sides clamped to what covers every key: keeps the ints small and the masks exact."""
    return (nq if left < 0 else min(left, nq)), (nk if right < 0 else min(right, nk))


def _kpm_args(key_padding_mask, device):
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), 0, 0, False
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1), True


def _interpreter_operands(*tensors):
    """Triton's interpreter cannot do bf16 arithmetic (Triton issue 11584): on CPU, bf16 operands go in as fp32
    copies (results are still stored in bf16). On the GPU tensors pass through untouched, and so they do under the
    GPU launch configuration (tests/test_gpu_compile.py records bf16 launches there; their values are not used)."""
    device = tensors[0].device
    if device.type == "cpu" and tensors[0].dtype == torch.bfloat16 and not gpu_launch_config(device):
        return tuple(t.float() for t in tensors)
    return tensors


def _problem_class(q, k, left: int, right: int, has_kpm: bool, dropout: bool) -> tuple:
    """What the best tiles depend on, bucketed to powers of two: dtype, options, lengths, window span, heads."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    return (q.dtype, has_kpm, dropout, next_pow2(nq), next_pow2(nk), next_pow2(min(left + right + 1, nk)),
            next_pow2(b * hq))


def forward(q, k, v, key_padding_mask, seed: int, scale: float, left: int, right: int, dropout_p: float):
    """(out contiguous (B, Hq, Nq, DV) in q's dtype, lse (B, Hq, Nq) float32)."""
    dtype = q.dtype
    q, k, v = _interpreter_operands(q, k, v)
    b, hq, nq, dk = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    left, right = _window_bounds(left, right, nq, nk)
    out = torch.empty((b, hq, nq, dv), dtype=dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    kpm, skpb, skpn, has_kpm = _kpm_args(key_padding_mask, q.device)
    kpc = kpm  # unused without padding
    if has_kpm:  # running count of kept keys: tells rows with no key from rows whose scores are all -inf
        kpc = torch.nn.functional.pad(torch.cumsum(~key_padding_mask, dim=1, dtype=torch.int32), (1, 0))
    block_dk, block_dv = max(16, next_pow2(dk)), max(16, next_pow2(dv))
    _launch(
        _fwd_kernel, "fwd", lambda c: (triton.cdiv(nq, c["BLOCK_M"]), b * hq),
        (q, k, v, out, lse, kpm, kpc, *q.stride(), *k.stride(), *v.stride(), skpb, skpn,
         hq, hq // hkv, nq, nk, left, right, scale * LOG2E, dropout_p, seed),
        dict(DK=dk, DV=dv, HAS_KPM=has_kpm, DROPOUT=dropout_p > 0, DOT_PRECISION=_dot_precision(q.dtype),
             BLOCK_DK=block_dk, BLOCK_DV=block_dv),
        q.device, max(block_dk, block_dv), _problem_class(q, k, left, right, has_kpm, dropout_p > 0),
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, seed: int, scale: float, left: int, right: int,
             dropout_p: float):
    """(dq, dk, dv), contiguous, in the inputs' dtype; dk/dv summed over each kv head's query heads. Deterministic:
    no atomics, every element is written by one program."""
    dtype = q.dtype
    grad_out, q, k, v, out = _interpreter_operands(grad_out, q, k, v, out)
    lse = lse.contiguous()  # read as (B * Hq, Nq) rows
    b, hq, nq, dk_dim = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    left, right = _window_bounds(left, right, nq, nk)
    kpm, skpb, skpn, has_kpm = _kpm_args(key_padding_mask, q.device)
    block_dk, block_dv = max(16, next_pow2(dk_dim)), max(16, next_pow2(dv_dim))
    dropout = dropout_p > 0
    common = (nq, nk, left, right, scale, dropout_p, seed)
    constexprs = dict(DK=dk_dim, DV=dv_dim, HAS_KPM=has_kpm, DROPOUT=dropout, DOT_PRECISION=_dot_precision(q.dtype),
                      BLOCK_DK=block_dk, BLOCK_DV=block_dv)
    problem = _problem_class(q, k, left, right, has_kpm, dropout)

    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    dq = torch.empty((b, hq, nq, dk_dim), dtype=dtype, device=q.device)
    _launch(
        _bwd_dq_kernel, "dq", lambda c: (triton.cdiv(nq, c["BLOCK_M"]), b * hq),
        (q, k, v, out, grad_out, lse, delta, kpm, dq, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
         *grad_out.stride(), skpb, skpn, hq, hq // hkv, *common),
        constexprs, q.device, max(block_dk, block_dv), problem,
    )
    dk = torch.empty((b, hkv, nk, dk_dim), dtype=dtype, device=q.device)
    dv = torch.empty((b, hkv, nk, dv_dim), dtype=dtype, device=q.device)
    _launch(
        _bwd_dkdv_kernel, "dkdv", lambda c: (triton.cdiv(nk, c["BLOCK_N"]), b * hkv),
        (q, k, v, grad_out, lse, delta, kpm, dk, dv, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
         skpb, skpn, hkv, hq // hkv, *common),
        constexprs, q.device, max(block_dk, block_dv), problem,
    )
    return dq, dk, dv


def dropout_keep_mask(seed: int, batch: int, heads: int, nq: int, nk: int, dropout_p: float, device) -> torch.Tensor:
    """Bool (batch, heads, Nq, Nk): the elements the kernels keep for this seed (tests compare against it)."""
    keep = torch.empty((batch, heads, nq, nk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(nq, 32), triton.cdiv(nk, 32), batch * heads)
    _dropout_mask_kernel[grid](keep, nq, nk, seed, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()
