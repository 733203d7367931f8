"""Batch normalization in Triton: a per-channel reduction pass, a small finalize pass, an elementwise pass.

Both layouts are seen as a row-major matrix [R, K] whose last dim is contiguous:
  channel-major (NCHW, NCL, NCDHW): R = N*C rows of K = spatial elements; the channel of row r is r % C;
  channel-minor (channels_last, (N, C)): R = N*spatial rows of K = C elements; the channel of column k is k.

Statistics are a [3, C] tensor (center, mean, invstd): the batch mean is center + mean. The center is the mean of
the channel's first tile (up to BLOCK values), within a small fraction of a standard deviation of the batch mean, so
the per-lane sums of d = x - center and d^2 lose nothing to cancellation (inputs like 1e4 + randn keep every digit:
x - center is exact there), and x - center - mean stays accurate where x - (center + mean) rounded to fp32 would
not. A center that is not finite (an inf or NaN in the first tile) is replaced by 0, so an inf input gives an inf
mean and a NaN variance, as torch's sum(x) / n and sum((x - mean)^2) / n do. In eval the center is 0 and mean the
running mean.
Forward (training): every program of a channel computes the same center (program 0 stores it), sums d and d^2 over
its share of the channel per lane with no block reduction in the loop, and writes its two sums, [2, C, splits]; the
finalize pass adds each channel's splits as one 2-D tile (in parallel, not one split after another), updates the
running statistics (unbiased variance) and writes the statistics. The apply pass computes
y = (x - center - mean) * invstd * weight + bias (+ ReLU, NaN kept as torch.relu keeps it).
Backward: the same reduction sums g' and g' * d, d = x - center - mean, where g' is the gradient masked by ReLU's
mask recomputed from x and the statistics (neither the output nor a mask is saved; the mask is y > 0 or y NaN, as
torch.relu's gradient); finalize into grad_weight, grad_bias and the coefficients of
dx = (g' + d * beta + gamma) * invstd * weight, torch's formula (its NaN/inf pattern for an inf weight too).

The reduce grid is cut into splits that fill the GPU's resident program slots in whole waves (launch.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import store_rounded
from .launch import block_for, next_pow2, num_warps_for, resident_programs, sm_count, splits_in_waves

# The reduce kernels are compiled with at most 64 registers per thread (``maxnreg``; at the tile sizes of
# ``_reduce`` ptxas needs 60-64 for sm_90 without spilling, bench/NOTES.md "Batch norm"), so 4 programs of 8 warps
# are resident per SM, and the grid is cut into whole waves of those.
_REDUCE_REGISTERS = 64
_REDUCE_WARPS = 8


@triton.jit
def _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC: tl.constexpr,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel (center, mean, invstd, scale, shift) of y = (x - center - mean) * scale + shift."""
    center = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
    mean = tl.load(stats_ptr + C + c, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(scale)
    return center, mean, scale, shift


@triton.jit
def _through_relu(g, d, scale, shift, RELU: tl.constexpr):
    """g', the gradient through ReLU when it is fused: zero where the forward's output d * scale + shift is <= 0
    (a NaN output passes the gradient, as torch.relu's backward does)."""
    if RELU:
        g = tl.where(d * scale + shift <= 0, 0.0, g)
    return g


@triton.jit
def _reduce_terms(x, g, center, mean, scale, shift, BACKWARD: tl.constexpr, RELU: tl.constexpr):
    """The two per-element quantities a pass sums: (d, d^2) forward, (g', g' * d) backward; d = x - center - mean."""
    d = (x - center) - mean
    if BACKWARD:
        g = _through_relu(g, d, scale, shift, RELU)
        return g, g * d
    return d, d * d


@triton.jit
def _finite_or_zero(center):
    return tl.where(tl.abs(center) < float("inf"), center, 0.0)


@triton.jit
def _reduce_channel_major(
    x_ptr, g_ptr, stats_ptr, weight_ptr, bias_ptr, sum1_ptr, sum2_ptr,
    N, C, K, n_splits,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (c, split) sums samples [split * N // n_splits, (split + 1) * N // n_splits) of channel c, all K
    elements of each (splits differ by at most one sample)."""
    c = tl.program_id(0)
    split = tl.program_id(1)
    n_start = (split.to(tl.int64) * N) // n_splits
    n_end = ((split.to(tl.int64) + 1) * N) // n_splits
    if BACKWARD:
        center, mean, scale, shift = _affine(c, True, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
    else:
        k_first = tl.arange(0, BLOCK_K)
        first = tl.load(x_ptr + c.to(tl.int64) * K + k_first, mask=k_first < K, other=0.0).to(ACC)  # sample 0
        center = _finite_or_zero(tl.sum(first, axis=0) / tl.minimum(K, BLOCK_K))
        tl.store(stats_ptr + c, center, mask=split == 0)
        mean, scale, shift = 0.0, 0.0, 0.0
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        row = (n.to(tl.int64) * C + c) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (n < n_end)[:, None] & (k < K)[None, :]
            offs = row[:, None] + k[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) if BACKWARD else x
            t1, t2 = _reduce_terms(x, g, center, mean, scale, shift, BACKWARD, RELU)
            acc1 += tl.where(mask, t1, 0.0)
            acc2 += tl.where(mask, t2, 0.0)
    tl.store(sum1_ptr + c * n_splits + split, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(sum2_ptr + c * n_splits + split, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _reduce_channel_minor(
    x_ptr, g_ptr, stats_ptr, weight_ptr, bias_ptr, sum1_ptr, sum2_ptr,
    R, C, n_splits,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, split) sums its share of the row blocks (shares differ by at most one block) for
    BLOCK_C channels."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = c < C
    row_blocks = tl.cdiv(R, BLOCK_R)
    r_start = ((split.to(tl.int64) * row_blocks) // n_splits) * BLOCK_R
    r_end = tl.minimum((((split.to(tl.int64) + 1) * row_blocks) // n_splits) * BLOCK_R, R)
    if BACKWARD:
        center, mean, scale, shift = _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
        center, mean, scale, shift = center[None, :], mean[None, :], scale[None, :], shift[None, :]
    else:
        r_first = tl.arange(0, BLOCK_R)
        first_mask = (r_first < R)[:, None] & c_ok[None, :]
        first = tl.load(x_ptr + r_first.to(tl.int64)[:, None] * C + c[None, :], mask=first_mask, other=0.0).to(ACC)
        center = _finite_or_zero(tl.sum(first, axis=0) / tl.minimum(R, BLOCK_R))
        tl.store(stats_ptr + c, center, mask=c_ok & (split == 0))
        center = center[None, :]
        mean, scale, shift = 0.0, 0.0, 0.0
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & c_ok[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) if BACKWARD else x
        t1, t2 = _reduce_terms(x, g, center, mean, scale, shift, BACKWARD, RELU)
        acc1 += tl.where(mask, t1, 0.0)
        acc2 += tl.where(mask, t2, 0.0)
    tl.store(sum1_ptr + c * n_splits + split, tl.sum(acc1, axis=0), mask=c_ok)
    tl.store(sum2_ptr + c * n_splits + split, tl.sum(acc2, axis=0), mask=c_ok)


@triton.jit
def _sum_splits(ptr, c, c_ok, n_splits, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel, the sum of its n_splits partial sums (contiguous per channel), read as [BLOCK_C, BLOCK_S] tiles:
    every split's load is in flight at once (one tile covers up to 1024 splits)."""
    total = tl.zeros((BLOCK_C, BLOCK_S), ACC)
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < n_splits)[None, :]
        total += tl.load(ptr + c[:, None] * n_splits + s[None, :], mask=mask, other=0.0)
    return tl.sum(total, axis=1)


@triton.jit
def _finalize_forward(
    sum1_ptr, sum2_ptr, n_splits, count,
    running_mean_ptr, running_var_ptr, stats_ptr,
    C, momentum, eps,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per channel: batch (training) or running (eval) statistics, and the running-statistics update."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        mean = _sum_splits(sum1_ptr, c, c_ok, n_splits, ACC, BLOCK_C, BLOCK_S) / count
        var = _sum_splits(sum2_ptr, c, c_ok, n_splits, ACC, BLOCK_C, BLOCK_S) / count - mean * mean
        var = tl.where(var < 0.0, 0.0, var)  # rounding can make it slightly negative; NaN stays NaN
        if HAS_RUNNING:
            center = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
            rm = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
            rv = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
            store_rounded(running_mean_ptr, c, momentum * (center + mean) + (1.0 - momentum) * rm, c_ok)
            store_rounded(running_var_ptr, c, momentum * (var * (count / (count - 1.0))) + (1.0 - momentum) * rv, c_ok)
    else:
        tl.store(stats_ptr + c, tl.zeros((BLOCK_C,), ACC), mask=c_ok)
        mean = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
        var = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
    tl.store(stats_ptr + C + c, mean, mask=c_ok)
    tl.store(stats_ptr + 2 * C + c, 1.0 / tl.sqrt(var + eps), mask=c_ok)


@triton.jit
def _finalize_backward(
    sum_g_ptr, sum_gd_ptr, n_splits, count,
    stats_ptr, grad_weight_ptr, grad_bias_ptr, beta_ptr, gamma_ptr,
    C,
    ACC: tl.constexpr, TRAINING: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per channel: grad_weight = sum(g' * xhat), grad_bias = sum(g'), and beta, gamma of dx (module docstring)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_g = _sum_splits(sum_g_ptr, c, c_ok, n_splits, ACC, BLOCK_C, BLOCK_S)
    sum_gd = _sum_splits(sum_gd_ptr, c, c_ok, n_splits, ACC, BLOCK_C, BLOCK_S)
    invstd = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    if GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_gd * invstd, mask=c_ok)
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_g, mask=c_ok)
    if TRAINING:
        tl.store(beta_ptr + c, -(sum_gd / count) * (invstd * invstd), mask=c_ok)
        tl.store(gamma_ptr + c, -sum_g / count, mask=c_ok)


@triton.jit
def _apply(
    x_ptr, g_ptr, out_ptr, stats_ptr, weight_ptr, bias_ptr, beta_ptr, gamma_ptr,
    R, K, C,
    ACC: tl.constexpr, CHANNEL_MINOR: tl.constexpr, BACKWARD: tl.constexpr, TRAINING: tl.constexpr,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: out = d * scale + shift, ReLU'd. Backward: out = (g' + d * beta + gamma) * scale (training; eval
    has no batch-statistics terms: g' * scale). d = x - center - mean."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    if CHANNEL_MINOR:
        c, c_ok = k, k < K
    else:
        c, c_ok = r % C, r < R
    center, mean, scale, shift = _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
    if CHANNEL_MINOR:
        center, mean, scale, shift = center[None, :], mean[None, :], scale[None, :], shift[None, :]
    else:
        center, mean, scale, shift = center[:, None], mean[:, None], scale[:, None], shift[:, None]
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = (x - center) - mean
    if BACKWARD:
        g = _through_relu(tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC), d, scale, shift, RELU)
        if TRAINING:
            beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0)
            gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0)
            if CHANNEL_MINOR:
                beta, gamma = beta[None, :], gamma[None, :]
            else:
                beta, gamma = beta[:, None], gamma[:, None]
            g = g + d * beta + gamma
        y = g * scale
    else:
        y = d * scale + shift
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does (tl.maximum would drop it)
    store_rounded(out_ptr, offs, y, mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(x: torch.Tensor, channel_minor: bool) -> tuple[int, int, int, int]:
    """(N, C, R, K) of the row-major [R, K] view described in the module docstring."""
    n, c = x.shape[0], x.shape[1]
    spatial = x.numel() // max(n * c, 1)
    return (n, c, n * spatial, c) if channel_minor else (n, c, n * c, spatial)


def _reduce(x, g, stats, affine, channel_minor: bool, relu: bool):
    """Per-channel partial sums, [2, C, splits]: forward (d, d^2), backward (g', g' * d)."""
    n, c, rows, k = _geometry(x, channel_minor)
    backward = g is not None
    slots = sm_count(x.device) * resident_programs(_REDUCE_WARPS, _REDUCE_REGISTERS)
    # 32 bytes of loads per thread and iteration (x, and g backward): 4096 bf16 or 2048 fp32 elements forward, half
    # that backward. The per-lane accumulators then fit _REDUCE_REGISTERS without spilling (ptxas, sm_90).
    tile = max(256, 32 * 32 * _REDUCE_WARPS // (x.element_size() * (2 if backward else 1)))
    if channel_minor:
        block_c = min(next_pow2(c), 64)
        block_r = max(16, tile // block_c)
        c_blocks = triton.cdiv(c, block_c)
        splits = splits_in_waves(triton.cdiv(rows, block_r), c_blocks, slots)
        grid, kernel = (c_blocks, splits), _reduce_channel_minor
        sizes = dict(BLOCK_R=block_r, BLOCK_C=block_c)
        geometry = (rows, c, splits)
    else:
        block_k = block_for(k, max_block=tile)
        block_n = max(1, min(next_pow2(n), tile // block_k))
        splits = splits_in_waves(n, c, slots)
        grid, kernel = (c, splits), _reduce_channel_major
        sizes = dict(BLOCK_N=block_n, BLOCK_K=block_k)
        geometry = (n, c, k, splits)
    parts = torch.empty((2, c, splits), device=x.device, dtype=_acc_dtype(x.dtype))
    weight, bias = affine
    kernel[grid](
        x, x if g is None else g, stats, weight, bias, parts[0], parts[1], *geometry,
        ACC=_tl_acc(x.dtype), BACKWARD=backward, RELU=relu, HAS_WEIGHT=weight is not x, HAS_BIAS=bias is not x,
        num_warps=_REDUCE_WARPS, maxnreg=_REDUCE_REGISTERS, **sizes,
    )
    return parts


def _finalize_sizes(c: int, n_splits: int) -> dict:
    """A [BLOCK_C, BLOCK_S] tile of up to 2048 partial sums per program: all of a channel's splits in one load
    when there are up to 1024, and as many programs as that leaves channel blocks."""
    block_s = min(next_pow2(n_splits), 1024)
    block_c = max(1, min(next_pow2(c), 2048 // block_s))
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps_for(block_c * block_s))


def _apply_launch(x, g, out, stats, affine, coeffs, channel_minor: bool, training: bool, relu: bool):
    _, c, rows, k = _geometry(x, channel_minor)
    block_k = block_for(k)
    block_r = max(1, min(next_pow2(rows), 4096 // block_k))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    weight, bias = affine
    _apply[grid](
        x, x if g is None else g, out, stats, weight, bias, *coeffs, rows, k, c,
        ACC=_tl_acc(x.dtype), CHANNEL_MINOR=channel_minor, BACKWARD=g is not None, TRAINING=training, RELU=relu,
        HAS_WEIGHT=weight is not x, HAS_BIAS=bias is not x,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps_for(block_r * block_k),
    )


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as the kernels index it (contiguous): sliced, strided or expanded per-channel tensors are copied."""
    return None if t is None else t.contiguous()


def batch_norm_forward(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    channel_minor: bool,
):
    """Returns (out, stats [3, C]); updates running stats in place when training. ``x`` is dense in its layout; the
    per-channel tensors may have any strides (a non-contiguous running statistic is updated through a contiguous
    copy, copied back).

    Absent tensors are passed to kernels as ``x`` (never read: the HAS_* flags compare against it).
    """
    c = x.shape[1]
    stats = torch.empty((3, c), device=x.device, dtype=_acc_dtype(x.dtype))
    weight, bias, rm, rv = (_dense(t) for t in (weight, bias, running_mean, running_var))
    affine = (x if weight is None else weight, x if bias is None else bias)
    has_running = running_mean is not None
    if training:
        sum1, sum2 = _reduce(x, None, stats, affine, channel_minor, relu)
        n_splits = sum1.shape[1]
    else:
        sum1, sum2, n_splits = stats, stats, 1
    sizes = _finalize_sizes(c, n_splits)
    _finalize_forward[(triton.cdiv(c, sizes["BLOCK_C"]),)](
        sum1, sum2, n_splits, float(x.numel() // c),
        rm if has_running else stats, rv if has_running else stats, stats,
        c, momentum, eps,
        ACC=_tl_acc(x.dtype), TRAINING=training, HAS_RUNNING=has_running, **sizes,
    )
    if training and has_running:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not given:
                given.copy_(used)
    out = torch.empty_like(x)
    _apply_launch(x, None, out, stats, affine, (stats, stats), channel_minor, training, relu)
    return out, stats


def batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    training: bool,
    relu: bool,
    channel_minor: bool,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
):
    """Returns (grad_input or None, grad_weight or None, grad_bias or None). ``grad_out`` has ``x``'s layout."""
    _, c, rows, k = _geometry(x, channel_minor)
    acc = _acc_dtype(x.dtype)
    weight, bias = _dense(weight), _dense(bias)
    affine = (x if weight is None else weight, x if bias is None else bias)
    sum_g, sum_gd = _reduce(x, grad_out, stats, affine, channel_minor, relu)
    grad_weight = torch.empty(c, device=x.device, dtype=acc) if need_weight_grad else None
    grad_bias = torch.empty(c, device=x.device, dtype=acc) if need_bias_grad else None
    beta, gamma = torch.empty((2, c), device=x.device, dtype=acc)
    sizes = _finalize_sizes(c, sum_g.shape[1])
    _finalize_backward[(triton.cdiv(c, sizes["BLOCK_C"]),)](
        sum_g, sum_gd, sum_g.shape[1], float(rows * k // c),
        stats, stats if grad_weight is None else grad_weight, stats if grad_bias is None else grad_bias,
        beta, gamma,
        c,
        ACC=_tl_acc(x.dtype), TRAINING=training, GRAD_WEIGHT=need_weight_grad, GRAD_BIAS=need_bias_grad, **sizes,
    )
    grad_input = None
    if need_input_grad:
        grad_input = torch.empty_like(x)
        _apply_launch(x, grad_out, grad_input, stats, affine, (beta, gamma), channel_minor, training, relu)
    return grad_input, grad_weight, grad_bias
