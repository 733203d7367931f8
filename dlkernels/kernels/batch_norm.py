"""Batch normalization in Triton: a per-channel reduction pass, a tiny finalize pass, an elementwise pass.

Both layouts are seen as a row-major matrix [R, K] whose last dim is contiguous:
  channel-major (NCHW, NCL, NCDHW): R = N*C rows of K = spatial elements; the channel of row r is r % C;
  channel-minor (channels_last, (N, C)): R = N*spatial rows of K = C elements; the channel of column k is k.

Statistics are a [3, C] tensor (center, mean, invstd): the batch mean is center + mean, where the center is the
channel's first element (an input value, so x - center is exact for inputs near it, as for 1e4 + randn) and mean is
the mean of x - center; in eval the center is 0 and mean the running mean.
Forward (training): each program reduces its tiles of x - center to (count, mean, M2) per channel, merging tile after
tile with Chan's formula (a tile's own mean and M2 come from two passes over registers); the finalize pass merges
the programs' partials the same way, updates the running statistics (unbiased variance) and writes the statistics.
The apply pass computes y = (x - center - mean) * invstd * weight + bias (+ ReLU).
Backward: reduce sum(g') and sum(g' * d), d = x - center - mean, per channel, where g' is the gradient masked by
ReLU's mask recomputed from x and the statistics (neither the output nor a mask is saved); finalize into
grad_weight, grad_bias and the coefficients of dx = g' * invstd * weight + d * beta + gamma; apply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import next_pow2, num_warps_for, sm_count


@triton.jit
def _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC: tl.constexpr,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel (center, mean, scale, shift) of y = (x - center - mean) * scale + shift."""
    center = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
    mean = tl.load(stats_ptr + C + c, mask=c_ok, other=0.0)
    scale = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(scale)
    return center, mean, scale, shift


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merges two (count, mean, M2) summaries (Chan et al.); counts are exact in floating point."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _grad_terms(x, g, center, mean, scale, shift, RELU: tl.constexpr):
    """(g', x - center - mean), with g' the gradient through ReLU when it is fused."""
    d = (x - center) - mean
    if RELU:
        g = tl.where(d * scale + shift > 0, g, 0.0)
    return g, d


@triton.jit
def _reduce_channel_major(
    x_ptr, g_ptr, stats_ptr, weight_ptr, bias_ptr, out1_ptr, out2_ptr, out3_ptr,
    N, C, K, n_per_split,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (c, split) over samples [split * n_per_split, ...) of channel c, all K elements each.

    Forward writes (count, mean, M2) of x - center; backward writes (sum g', sum g' * d) to row ``split`` of the
    outputs.
    """
    c = tl.program_id(0)
    split = tl.program_id(1)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    if BACKWARD:
        center, mean, scale, shift = _affine(c, True, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
        acc_g = tl.zeros((BLOCK_N, BLOCK_K), ACC)
        acc_gd = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    else:
        center = tl.load(x_ptr + c.to(tl.int64) * K).to(ACC)  # sample 0, element 0 of channel c
        count = tl.zeros((), ACC)
        mean = tl.zeros((), ACC)
        m2 = tl.zeros((), ACC)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        row = (n.to(tl.int64) * C + c) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (n < n_end)[:, None] & (k < K)[None, :]
            offs = row[:, None] + k[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            if BACKWARD:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
                g, d = _grad_terms(x, g, center, mean, scale, shift, RELU)
                acc_g += g
                acc_gd += tl.where(mask, g * d, 0.0)
            else:
                x = tl.where(mask, x - center, 0.0)
                t_count = tl.sum(tl.sum(mask.to(ACC), axis=1), axis=0)
                t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / t_count
                t_dev = tl.where(mask, x - t_mean, 0.0)
                t_m2 = tl.sum(tl.sum(t_dev * t_dev, axis=1), axis=0)
                count, mean, m2 = _chan_merge(count, mean, m2, t_count, t_mean, t_m2)
    if BACKWARD:
        tl.store(out1_ptr + split * C + c, tl.sum(tl.sum(acc_g, axis=1), axis=0))
        tl.store(out2_ptr + split * C + c, tl.sum(tl.sum(acc_gd, axis=1), axis=0))
    else:
        tl.store(out1_ptr + split * C + c, count)
        tl.store(out2_ptr + split * C + c, mean)
        tl.store(out3_ptr + split * C + c, m2)


@triton.jit
def _reduce_channel_minor(
    x_ptr, g_ptr, stats_ptr, weight_ptr, bias_ptr, out1_ptr, out2_ptr, out3_ptr,
    R, C, rows_per_split,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, split) over rows [split * rows_per_split, ...) of BLOCK_C channels; outputs as in
    ``_reduce_channel_major``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = c < C
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    if BACKWARD:
        center, mean, scale, shift = _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
        center, mean, scale, shift = center[None, :], mean[None, :], scale[None, :], shift[None, :]
        acc_g = tl.zeros((BLOCK_R, BLOCK_C), ACC)
        acc_gd = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    else:
        center = tl.load(x_ptr + c, mask=c_ok, other=0.0).to(ACC)  # row 0 holds each channel's first element
        count = tl.zeros((BLOCK_C,), ACC)
        mean = tl.zeros((BLOCK_C,), ACC)
        m2 = tl.zeros((BLOCK_C,), ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & c_ok[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            g, d = _grad_terms(x, g, center, mean, scale, shift, RELU)
            acc_g += g
            acc_gd += tl.where(mask, g * d, 0.0)
        else:
            x = tl.where(mask, x - center[None, :], 0.0)
            t_count = tl.sum((r < r_end).to(ACC), axis=0)
            t_mean = tl.sum(x, axis=0) / t_count
            t_dev = tl.where(mask, x - t_mean[None, :], 0.0)
            t_m2 = tl.sum(t_dev * t_dev, axis=0)
            count, mean, m2 = _chan_merge(count, mean, m2, t_count, t_mean, t_m2)
    if BACKWARD:
        tl.store(out1_ptr + split * C + c, tl.sum(acc_g, axis=0), mask=c_ok)
        tl.store(out2_ptr + split * C + c, tl.sum(acc_gd, axis=0), mask=c_ok)
    else:
        tl.store(out1_ptr + split * C + c, count, mask=c_ok)
        tl.store(out2_ptr + split * C + c, mean, mask=c_ok)
        tl.store(out3_ptr + split * C + c, m2, mask=c_ok)


@triton.jit
def _finalize_forward(
    x_ptr, center_stride, count_ptr, part_mean_ptr, part_m2_ptr, n_splits,
    running_mean_ptr, running_var_ptr, stats_ptr,
    C, momentum, eps,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel: batch (training) or running (eval) statistics, and the running-statistics update."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        count = tl.zeros((BLOCK_C,), ACC)
        mean = tl.zeros((BLOCK_C,), ACC)
        m2 = tl.zeros((BLOCK_C,), ACC)
        for s in range(0, n_splits):
            count, mean, m2 = _chan_merge(
                count, mean, m2,
                tl.load(count_ptr + s * C + c, mask=c_ok, other=0.0),
                tl.load(part_mean_ptr + s * C + c, mask=c_ok, other=0.0),
                tl.load(part_m2_ptr + s * C + c, mask=c_ok, other=0.0),
            )
        var = m2 / tl.maximum(count, 1.0)  # masked lanes have count 0
        center = tl.load(x_ptr + c.to(tl.int64) * center_stride, mask=c_ok, other=0.0).to(ACC)
        if HAS_RUNNING:
            rm = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
            rv = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
            tl.store(running_mean_ptr + c, (1.0 - momentum) * rm + momentum * (center + mean), mask=c_ok)
            unbiased = m2 / tl.maximum(count - 1.0, 1.0)
            tl.store(running_var_ptr + c, (1.0 - momentum) * rv + momentum * unbiased, mask=c_ok)
    else:
        center = tl.zeros((BLOCK_C,), ACC)
        mean = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
        var = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
    tl.store(stats_ptr + c, center, mask=c_ok)
    tl.store(stats_ptr + C + c, mean, mask=c_ok)
    tl.store(stats_ptr + 2 * C + c, 1.0 / tl.sqrt(var + eps), mask=c_ok)


@triton.jit
def _finalize_backward(
    sum_g_ptr, sum_gd_ptr, n_splits, count,
    stats_ptr, weight_ptr, grad_weight_ptr, grad_bias_ptr, beta_ptr, gamma_ptr,
    C,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel: grad_weight = sum(g' * xhat), grad_bias = sum(g'), and beta, gamma of dx (module docstring)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_g = tl.zeros((BLOCK_C,), ACC)
    sum_gd = tl.zeros((BLOCK_C,), ACC)
    for s in range(0, n_splits):
        sum_g += tl.load(sum_g_ptr + s * C + c, mask=c_ok, other=0.0)
        sum_gd += tl.load(sum_gd_ptr + s * C + c, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    if GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_gd * invstd, mask=c_ok)
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_g, mask=c_ok)
    if TRAINING:
        scale = invstd
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC)
        tl.store(beta_ptr + c, -scale * invstd * invstd * sum_gd / count, mask=c_ok)
        tl.store(gamma_ptr + c, -scale * sum_g / count, mask=c_ok)


@triton.jit
def _apply(
    x_ptr, g_ptr, out_ptr, stats_ptr, weight_ptr, bias_ptr, beta_ptr, gamma_ptr,
    R, K, C,
    ACC: tl.constexpr, CHANNEL_MINOR: tl.constexpr, BACKWARD: tl.constexpr, TRAINING: tl.constexpr,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: out = d * scale + shift, ReLU'd. Backward: out = g' * scale + d * beta + gamma (training; eval has
    no batch-statistics terms). d = x - center - mean."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    if CHANNEL_MINOR:
        c, c_ok = k, k < K
    else:
        c, c_ok = r % C, r < R
    center, mean, scale, shift = _affine(c, c_ok, stats_ptr, C, weight_ptr, bias_ptr, ACC, HAS_WEIGHT, HAS_BIAS)
    if BACKWARD and TRAINING:
        beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0)
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0)
    else:
        beta = tl.zeros_like(mean)
        gamma = tl.zeros_like(mean)
    if CHANNEL_MINOR:
        center, mean, scale, shift = center[None, :], mean[None, :], scale[None, :], shift[None, :]
        beta, gamma = beta[None, :], gamma[None, :]
    else:
        center, mean, scale, shift = center[:, None], mean[:, None], scale[:, None], shift[:, None]
        beta, gamma = beta[:, None], gamma[:, None]
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if BACKWARD:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        g, d = _grad_terms(x, g, center, mean, scale, shift, RELU)
        y = g * scale + d * beta + gamma
    else:
        y = ((x - center) - mean) * scale + shift
        if RELU:
            y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


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
    """Per-channel partials, one row per split: forward (count, mean, M2), backward (sum g', sum g' * d)."""
    n, c, rows, k = _geometry(x, channel_minor)
    backward = g is not None
    target = 4 * sm_count(x.device)  # enough programs to fill the card a few times over
    if channel_minor:
        block_c = min(next_pow2(c), 64)
        block_r = max(16, 4096 // block_c)
        c_blocks = triton.cdiv(c, block_c)
        splits = max(1, min(triton.cdiv(target, c_blocks), triton.cdiv(rows, block_r)))
        per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
        splits = triton.cdiv(rows, per_split)
        grid, kernel = (c_blocks, splits), _reduce_channel_minor
        sizes = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps_for(block_r * block_c))
        geometry = (rows, c, per_split)
    else:
        block_k = min(next_pow2(k), 1024)
        block_n = max(1, min(next_pow2(n), 4096 // block_k))
        splits = max(1, min(triton.cdiv(target, c), n))
        per_split = triton.cdiv(n, splits)
        splits = triton.cdiv(n, per_split)
        grid, kernel = (c, splits), _reduce_channel_major
        sizes = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps_for(block_n * block_k))
        geometry = (n, c, k, per_split)
    parts = torch.empty((2 if backward else 3, splits, c), device=x.device, dtype=_acc_dtype(x.dtype))
    weight, bias = affine
    kernel[grid](
        x, x if g is None else g, stats, weight, bias, parts[0], parts[1], parts[-1], *geometry,
        ACC=_tl_acc(x.dtype), BACKWARD=backward, RELU=relu, HAS_WEIGHT=weight is not x, HAS_BIAS=bias is not x,
        **sizes,
    )
    return parts


def _apply_launch(x, g, out, stats, affine, coeffs, channel_minor: bool, training: bool, relu: bool):
    _, c, rows, k = _geometry(x, channel_minor)
    block_k = min(next_pow2(k), 1024)
    block_r = max(1, min(next_pow2(rows), 4096 // block_k))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    weight, bias = affine
    _apply[grid](
        x, x if g is None else g, out, stats, weight, bias, *coeffs, rows, k, c,
        ACC=_tl_acc(x.dtype), CHANNEL_MINOR=channel_minor, BACKWARD=g is not None, TRAINING=training, RELU=relu,
        HAS_WEIGHT=weight is not x, HAS_BIAS=bias is not x,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps_for(block_r * block_k),
    )


def _block_c(c: int) -> int:
    return min(next_pow2(c), 1024)


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
    """Returns (out, stats [3, C]); updates running stats in place when training. ``x`` is dense in its layout.

    Absent tensors are passed to kernels as ``x`` (never read: the HAS_* flags compare against it).
    """
    _, c, _, k = _geometry(x, channel_minor)
    stats = torch.empty((3, c), device=x.device, dtype=_acc_dtype(x.dtype))
    affine = (x if weight is None else weight, x if bias is None else bias)
    parts = _reduce(x, None, stats, affine, channel_minor, relu) if training else (stats, stats, stats)
    has_running = running_mean is not None
    block_c = _block_c(c)
    _finalize_forward[(triton.cdiv(c, block_c),)](
        x, 1 if channel_minor else k, *parts, parts[0].shape[0] if training else 0,
        running_mean if has_running else stats, running_var if has_running else stats, stats,
        c, momentum, eps,
        ACC=_tl_acc(x.dtype), TRAINING=training, HAS_RUNNING=has_running, BLOCK_C=block_c,
    )
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
    affine = (x if weight is None else weight, x if bias is None else bias)
    sum_g, sum_gd = _reduce(x, grad_out, stats, affine, channel_minor, relu)
    grad_weight = torch.empty(c, device=x.device, dtype=acc) if need_weight_grad else None
    grad_bias = torch.empty(c, device=x.device, dtype=acc) if need_bias_grad else None
    beta, gamma = torch.empty((2, c), device=x.device, dtype=acc)
    block_c = _block_c(c)
    _finalize_backward[(triton.cdiv(c, block_c),)](
        sum_g, sum_gd, sum_g.shape[0], float(rows * k // c),
        stats, affine[0], stats if grad_weight is None else grad_weight, stats if grad_bias is None else grad_bias,
        beta, gamma,
        c,
        ACC=_tl_acc(x.dtype), TRAINING=training, HAS_WEIGHT=weight is not None,
        GRAD_WEIGHT=need_weight_grad, GRAD_BIAS=need_bias_grad, BLOCK_C=block_c,
    )
    grad_input = None
    if need_input_grad:
        grad_input = torch.empty_like(x)
        _apply_launch(x, grad_out, grad_input, stats, affine, (beta, gamma), channel_minor, training, relu)
    return grad_input, grad_weight, grad_bias
