"""Flash-attention-2 style attention in Triton: forward, backward (dK/dV, dQ) and the dropout mask, with windows.

Forward: one program per (query block, batch * query head) streams the key blocks that intersect the window
``[i - left, i + right]`` of its rows (online softmax in base 2, fp32 accumulators) and stores the output and the
row log-sum-exp (natural log; +inf for rows with no key, so ``exp(s - lse) = 0`` there). Backward: ``delta =
rowsum(dO * O)``, then one program per (key block, batch * kv head) loops over the query heads of its group and the
query blocks in the window, accumulating dK and dV in registers (so the group sum needs no atomics); dQ is either
added there with fp32 atomics or, when deterministic, computed by a second kernel per query block (no atomics).
Dropout keeps an element iff ``rand(seed, ((b * Hq + h) * Nq + i) * Nk + j) >= p``, so forward and backward agree.

The head dim is padded to a power of two (``BLOCK_D``) with masked loads; it is a compile-time constant (fixed per
model), so the masks along it are known and loads stay vectorized and pipelined for any head dim; sequence ends and windows are masks,
computed only on boundary blocks: each block loop runs in three phases (masked, unmasked, masked), the middle one
over blocks that lie wholly inside every row's window and the sequence.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import gpu_launch_config, next_pow2

LOG2E = 1.4426950408889634  # host side only: jit code spells constants out (globals must be constexpr there)


def block_config(head_dim_block: int, device: torch.device, kind: str) -> dict:
    """Launch parameters for ``kind`` in {"fwd", "dkdv", "dq"}: BLOCK_M (queries), BLOCK_N (keys), warps, stages.

    GPU sizes: the largest tiles for which ptxas (sm_90, fp16/bf16, no padding mask or dropout) reports no register
    spills, or the fewest; chosen from cuobjdump's resource usage on 2026-11-28, not yet timed on a GPU (see
    bench/NOTES.md). The dK/dV pass spills at every tile size for head dims above 64 (152 bytes at D=128 with the
    sizes below, 600-2200 with larger tiles). Under the interpreter small blocks keep the per-op numpy work cheap.
    """
    if not gpu_launch_config(device):
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if kind == "fwd":
        if head_dim_block <= 64:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        if head_dim_block <= 128:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if kind == "dkdv":
        if head_dim_block <= 128:
            return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1)
    if head_dim_block <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    if head_dim_block <= 128:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)


@triton.jit
def _allowed(rows, cols, Nq, Nk, LEFT, RIGHT, kpm_row, stride_kpm_n, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: row i may attend column j (in range, inside the window, not padding)."""
    ok = (rows[:, None] < Nq) & (cols[None, :] < Nk)
    ok &= (cols[None, :] >= rows[:, None] - LEFT) & (cols[None, :] <= rows[:, None] + RIGHT)
    if HAS_KPM:
        pad = tl.load(kpm_row + cols.to(tl.int64) * stride_kpm_n, mask=cols < Nk, other=1)
        ok &= pad[None, :] == 0
    return ok


@triton.jit
def _dropout_keep(seed, bh, rows, cols, Nq, Nk, dropout_p):
    """Philox keep-mask for (batch * query head ``bh``, rows, cols); the one formula forward and backward share."""
    offsets = (bh.to(tl.int64) * Nq + rows.to(tl.int64))[:, None] * Nk + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _phase_bounds(lo, hi, full_lo, full_hi):
    """Splits the block loop [lo, hi) into masked [lo, a), unmasked [a, b), masked [b, hi) (a, b clamped)."""
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return a, b


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n,
    bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax. MASKED: apply the range and window masks (boundary blocks only)."""
    cols = start_n + offs_n
    col_ok = cols < Nk
    kt = tl.load(
        k_base + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=col_ok[None, :] & d_ok[:, None], other=0.0,
    )
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where(_allowed(rows, cols, Nq, Nk, LEFT, RIGHT, kpm_row, stride_kpm_n, HAS_KPM), s, float("-inf"))
    elif HAS_KPM:
        pad = tl.load(kpm_row + cols.to(tl.int64) * stride_kpm_n)
        s = tl.where(pad[None, :] == 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed so far keeps m = -inf; exponentiate against 0 there to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows, cols, Nq, Nk, dropout_p), p, 0.0)
    v = tl.load(
        v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=col_ok[:, None] & d_ok[None, :], other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KPM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kpm_b, stride_kpm_n,
    H, GROUP, Nq, Nk, D: tl.constexpr, LEFT, RIGHT, scale_log2, dropout_p, seed,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(rows[:, None] < Nq) & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_row = KPM + b * stride_kpm_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Only key blocks that meet the window of some row in this block: cost ~ N * (left + right). Blocks wholly
    # inside every row's window and the key range, [full_lo, full_hi), skip the mask arithmetic.
    lo = tl.maximum(m_start - LEFT, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M + RIGHT, Nk)
    full_lo = tl.cdiv(tl.maximum(m_start + BLOCK_M - 1 - LEFT, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(m_start + RIGHT + 1, Nk) // BLOCK_N * BLOCK_N
    full_lo, full_hi = _phase_bounds(lo, hi, full_lo, full_hi)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, False, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows[:, None] < Nq) & d_ok[None, :])
    # Natural-log lse: (m + log2 l) * ln 2.
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(Lse + bh.to(tl.int64) * Nq + rows, lse, mask=rows < Nq)


@triton.jit
def _bwd_delta_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Nq, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO[i, d] * O[i, d] (fp32): the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Nq) & (offs_d[None, :] < D)
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + r64 * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    g = tl.load(dOut + b * stride_gb + h * stride_gh + r64 * stride_gm + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Nq + rows, delta, mask=rows < Nq)


@triton.jit
def _bwd_probs(
    q, k, v, do, lse, delta, rows, cols, kpm_row, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(P after dropout, dS) of a (query block, key block) tile, recomputed from the saved lse."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    # lse of a row with no key is +inf, so its p is exactly 0 (and so is its dS).
    p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
    if MASKED:
        p = tl.where(_allowed(rows, cols, Nq, Nk, LEFT, RIGHT, kpm_row, stride_kpm_n, HAS_KPM), p, 0.0)
    elif HAS_KPM:
        pad = tl.load(kpm_row + cols.to(tl.int64) * stride_kpm_n)
        p = tl.where(pad[None, :] == 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows, cols, Nq, Nk, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_dropped = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    return p_dropped, ds


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_base, do_base, Lse, Delta, kpm_row, start_m, offs_m, cols, offs_d, d_ok, dQacc,
    stride_qm, stride_qd, stride_gm, stride_gd, stride_kpm_n,
    bh, Nq, Nk, D: tl.constexpr, LEFT, RIGHT, scale_log2, dropout_p, seed,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = start_m + offs_m
    r64 = rows.to(tl.int64)[:, None]
    row_mask = (rows[:, None] < Nq) & d_ok[None, :]
    # Rows past Nq load q = dO = 0 and lse = +inf: they add nothing, so full blocks need no row mask.
    q = tl.load(q_base + r64 * stride_qm + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    do = tl.load(do_base + r64 * stride_gm + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
    lse = tl.load(Lse + bh * Nq + rows, mask=rows < Nq, other=float("inf"))
    delta = tl.load(Delta + bh * Nq + rows, mask=rows < Nq, other=0.0)
    p_dropped, ds = _bwd_probs(
        q, k, v, do, lse, delta, rows, cols, kpm_row, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
        dropout_p, seed, MASKED, HAS_KPM, DROPOUT, DOT_PRECISION,
    )
    dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
    ds = ds.to(q.dtype)
    dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        dq_part = tl.dot(ds, k, input_precision=DOT_PRECISION)
        tl.atomic_add(dQacc + (bh * Nq + r64) * D + offs_d[None, :], dq_part, mask=row_mask)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, KPM, dQacc, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_kpm_b, stride_kpm_n,
    HKV, GROUP, Nq, Nk, D: tl.constexpr, LEFT, RIGHT, scale, dropout_p, seed,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (key block, batch * kv head): dK, dV of its keys summed over the group's query heads.

    dK, dV are written contiguous (B, Hkv, Nk, D); with ATOMIC_DQ, dQ (unscaled) is added into fp32 ``dQacc``
    (contiguous (B, Hq, Nq, D)).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    n_start = pid_n * BLOCK_N
    cols = n_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols[:, None] < Nk) & d_ok[None, :]
    c64 = cols.to(tl.int64)[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + c64 * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + c64 * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    kpm_row = KPM + b * stride_kpm_b
    scale_log2 = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks whose window meets these keys: rows in [n_start - RIGHT, n_start + BLOCK_N - 1 + LEFT]; those
    # whose every row sees every key of the block, [full_lo, full_hi), skip the masks (none if the block passes Nk).
    lo = tl.maximum(n_start - RIGHT, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(n_start + BLOCK_N + LEFT, Nq)
    full_lo = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - RIGHT, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.minimum(n_start + LEFT + 1, Nq) // BLOCK_M * BLOCK_M
    full_hi = tl.where(n_start + BLOCK_N <= Nk, full_hi, 0)
    full_lo, full_hi = _phase_bounds(lo, hi, full_lo, full_hi)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * (HKV * GROUP) + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_gb + h * stride_gh
        for start_m in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, Lse, Delta, kpm_row, start_m, offs_m, cols, offs_d, d_ok, dQacc,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_kpm_n, bh, Nq, Nk, D, LEFT, RIGHT, scale_log2,
                dropout_p, seed, True, HAS_KPM, DROPOUT, ATOMIC_DQ, DOT_PRECISION,
            )
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, Lse, Delta, kpm_row, start_m, offs_m, cols, offs_d, d_ok, dQacc,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_kpm_n, bh, Nq, Nk, D, LEFT, RIGHT, scale_log2,
                dropout_p, seed, False, HAS_KPM, DROPOUT, ATOMIC_DQ, DOT_PRECISION,
            )
        for start_m in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, Lse, Delta, kpm_row, start_m, offs_m, cols, offs_d, d_ok, dQacc,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_kpm_n, bh, Nq, Nk, D, LEFT, RIGHT, scale_log2,
                dropout_p, seed, True, HAS_KPM, DROPOUT, ATOMIC_DQ, DOT_PRECISION,
            )

    out_offs = (bhk.to(tl.int64) * Nk + c64) * D + offs_d[None, :]
    tl.store(dK + out_offs, (dk * scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + out_offs, dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n,
    bh, Nq, Nk, LEFT, RIGHT, scale_log2, dropout_p, seed,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = start_n + offs_n
    c64 = cols.to(tl.int64)[:, None]
    kv_mask = (cols[:, None] < Nk) & d_ok[None, :]
    k = tl.load(k_base + c64 * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + c64 * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    _, ds = _bwd_probs(
        q, k, v, do, lse, delta, rows, cols, kpm_row, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
        dropout_p, seed, MASKED, HAS_KPM, DROPOUT, DOT_PRECISION,
    )
    return dq + tl.dot(ds.to(q.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, KPM, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_kpm_b, stride_kpm_n,
    H, GROUP, Nq, Nk, D: tl.constexpr, LEFT, RIGHT, scale, dropout_p, seed,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (query block, batch * query head): dQ of its rows (written contiguous), no atomics."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r64 = rows.to(tl.int64)[:, None]
    row_mask = (rows[:, None] < Nq) & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + r64 * stride_qm + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    do = tl.load(
        dOut + b * stride_gb + h * stride_gh + r64 * stride_gm + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0
    )
    lse = tl.load(Lse + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_row = KPM + b * stride_kpm_b
    scale_log2 = scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(m_start - LEFT, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M + RIGHT, Nk)
    full_lo = tl.cdiv(tl.maximum(m_start + BLOCK_M - 1 - LEFT, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(m_start + RIGHT + 1, Nk) // BLOCK_N * BLOCK_N
    full_lo, full_hi = _phase_bounds(lo, hi, full_lo, full_hi)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, False, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_row, start_n, rows, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpm_n, bh, Nq, Nk, LEFT, RIGHT, scale_log2,
            dropout_p, seed, True, HAS_KPM, DROPOUT, DOT_PRECISION,
        )
    tl.store(dQ + (bh.to(tl.int64) * Nq + r64) * D + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dropout_mask_kernel(Keep, Nq, Nk, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use, materialized (B * Hq, Nq, Nk) for tests and debugging."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, bh, rows, cols, Nq, Nk, dropout_p)
    offs = (bh.to(tl.int64) * Nq + rows.to(tl.int64))[:, None] * Nk + cols[None, :]
    tl.store(Keep + offs, keep.to(tl.int8), mask=(rows[:, None] < Nq) & (cols[None, :] < Nk))


# ----------------------------------------------------------------------------------------------------------------
# Host launchers


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs (interpreter only; the GPU sends them to the reference path) use full-precision dots;
    # None (Triton's default) for fp16/bf16, where the option does not apply.
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


def forward(q, k, v, key_padding_mask, seed: int, scale: float, left: int, right: int, dropout_p: float):
    """(out contiguous (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32)."""
    dtype = q.dtype
    q, k, v = _interpreter_operands(q, k, v)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    left, right = _window_bounds(left, right, nq, nk)
    out = torch.empty((b, hq, nq, d), dtype=dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    kpm, skpb, skpn, has_kpm = _kpm_args(key_padding_mask, q.device)
    block_d = max(16, next_pow2(d))
    cfg = block_config(block_d, q.device, "fwd")
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, kpm,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), skpb, skpn,
        hq, hq // hkv, nq, nk, d, left, right, scale * LOG2E, dropout_p, seed,
        HAS_KPM=has_kpm, DROPOUT=dropout_p > 0, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d, **cfg,
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, seed: int, scale: float, left: int, right: int,
             dropout_p: float, deterministic: bool):
    """(dq, dk, dv), contiguous, in the inputs' dtype; dk/dv summed over each kv head's query heads."""
    dtype = q.dtype
    grad_out, q, k, v, out = _interpreter_operands(grad_out, q, k, v, out)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    left, right = _window_bounds(left, right, nq, nk)
    kpm, skpb, skpn, has_kpm = _kpm_args(key_padding_mask, q.device)
    block_d = max(16, next_pow2(d))
    precision = _dot_precision(q.dtype)
    dropout = dropout_p > 0

    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    delta_block = max(16, min(128, next_pow2(4096 // block_d)))
    _bwd_delta_kernel[(triton.cdiv(nq, delta_block), b * hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, nq, d, BLOCK_M=delta_block, BLOCK_D=block_d,
    )

    dk = torch.empty((b, hkv, nk, d), dtype=dtype, device=q.device)
    dv = torch.empty((b, hkv, nk, d), dtype=dtype, device=q.device)
    atomic_dq = not deterministic
    dq_acc = torch.zeros((b, hq, nq, d), dtype=torch.float32, device=q.device) if atomic_dq else dk
    cfg = block_config(block_d, q.device, "dkdv")
    _bwd_dkdv_kernel[(triton.cdiv(nk, cfg["BLOCK_N"]), b * hkv)](
        q, k, v, grad_out, lse, delta, kpm, dq_acc, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), skpb, skpn,
        hkv, group, nq, nk, d, left, right, scale, dropout_p, seed,
        HAS_KPM=has_kpm, DROPOUT=dropout, ATOMIC_DQ=atomic_dq, DOT_PRECISION=precision, BLOCK_D=block_d, **cfg,
    )
    if atomic_dq:
        return (dq_acc * scale).to(dtype), dk, dv

    dq = torch.empty((b, hq, nq, d), dtype=dtype, device=q.device)
    cfg = block_config(block_d, q.device, "dq")
    _bwd_dq_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]), b * hq)](
        q, k, v, grad_out, lse, delta, kpm, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), skpb, skpn,
        hq, group, nq, nk, d, left, right, scale, dropout_p, seed,
        HAS_KPM=has_kpm, DROPOUT=dropout, DOT_PRECISION=precision, BLOCK_D=block_d, **cfg,
    )
    return dq, dk, dv


def dropout_keep_mask(seed: int, batch: int, heads: int, nq: int, nk: int, dropout_p: float, device) -> torch.Tensor:
    """Bool (batch, heads, Nq, Nk): the elements the kernels keep for this seed (tests compare against it)."""
    keep = torch.empty((batch, heads, nq, nk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(nq, 32), triton.cdiv(nk, 32), batch * heads)
    _dropout_mask_kernel[grid](keep, nq, nk, seed, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()
