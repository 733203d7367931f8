"""Batch normalization in Triton: a per-channel reduction pass, a tiny finalize pass, an elementwise pass.

Both layouts are seen as a row-major matrix [R, K] whose last dim is contiguous:
  channel-major (NCHW, NCL, NCDHW): R = N*C rows of K = spatial elements; the channel of row r is r % C;
  channel-minor (channels_last, (N, C)): R = N*spatial rows of K = C elements; the channel of column k is k.
Forward (training): reduce shifted sums of x per channel (shift = the channel's first element, so inputs like
1e4 + randn keep their precision), finalize into mean / invstd / running stats and the affine coefficients
y = x * a + b, then apply. Backward: reduce sum(g') and sum(g' * (x - mean)) per channel, where g' is the gradient
masked by ReLU's mask recomputed from x with the forward's coefficients (no output or mask is saved), finalize into
grad_weight / grad_bias and dx = g' * alpha + x * beta + gamma, then apply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import next_pow2, num_warps_for, sm_count

_TL_ACC = {torch.float64: tl.float64}


@triton.jit
def _reduce_terms(x, g, shift, a, b, BACKWARD: tl.constexpr, RELU: tl.constexpr):
    """The two per-element quantities a pass sums: (x - s, (x - s)^2) forward, (g', g' * (x - mean)) backward."""
    d = x - shift
    if BACKWARD:
        if RELU:
            g = tl.where(x * a + b > 0, g, 0.0)
        return g, g * d
    return d, d * d


@triton.jit
def _reduce_channel_major(
    x_ptr, g_ptr, shift_ptr, a_ptr, b_ptr, sum1_ptr, sum2_ptr,
    N, C, K, n_per_split,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (c, split): sums over samples [split * n_per_split, ...) and all K elements of channel c."""
    c = tl.program_id(0)
    split = tl.program_id(1)
    if BACKWARD:
        shift = tl.load(shift_ptr + c).to(ACC)
        a = tl.load(a_ptr + c).to(ACC)
        b = tl.load(b_ptr + c).to(ACC)
    else:
        shift = tl.load(x_ptr + c.to(tl.int64) * K).to(ACC)  # sample 0, element 0 of channel c
        a = 0.0
        b = 0.0
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        row = (n.to(tl.int64) * C + c) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (n < n_end)[:, None] & (k < K)[None, :]
            offs = row[:, None] + k[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) if BACKWARD else x
            t1, t2 = _reduce_terms(x, g, shift, a, b, BACKWARD, RELU)
            acc1 += tl.where(mask, t1, 0.0)
            acc2 += tl.where(mask, t2, 0.0)
    tl.store(sum1_ptr + split * C + c, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(sum2_ptr + split * C + c, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _reduce_channel_minor(
    x_ptr, g_ptr, shift_ptr, a_ptr, b_ptr, sum1_ptr, sum2_ptr,
    R, C, rows_per_split,
    ACC: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, split): sums rows [split * rows_per_split, ...) of BLOCK_C channels."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = c < C
    if BACKWARD:
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(ACC)
        a = tl.load(a_ptr + c, mask=c_ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        shift = tl.load(x_ptr + c, mask=c_ok, other=0.0).to(ACC)  # row 0 holds each channel's first element
        a = tl.zeros((BLOCK_C,), ACC)
        b = tl.zeros((BLOCK_C,), ACC)
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & c_ok[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) if BACKWARD else x
        t1, t2 = _reduce_terms(x, g, shift[None, :], a[None, :], b[None, :], BACKWARD, RELU)
        acc1 += tl.where(mask, t1, 0.0)
        acc2 += tl.where(mask, t2, 0.0)
    tl.store(sum1_ptr + split * C + c, tl.sum(acc1, axis=0), mask=c_ok)
    tl.store(sum2_ptr + split * C + c, tl.sum(acc2, axis=0), mask=c_ok)


@triton.jit
def _sum_splits(ptr, c, c_ok, n_splits, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros((BLOCK_C,), ACC)
    for s in range(0, n_splits):
        total += tl.load(ptr + s * C + c, mask=c_ok, other=0.0)
    return total


@triton.jit
def _finalize_forward(
    x_ptr, sum1_ptr, sum2_ptr, n_splits, count, shift_stride,
    weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    mean_ptr, invstd_ptr, a_ptr, b_ptr,
    C, momentum, eps,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel: batch (training) or running (eval) statistics, running-stat update, y = x * a + b coefficients."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        shift = tl.load(x_ptr + c.to(tl.int64) * shift_stride, mask=c_ok, other=0.0).to(ACC)
        s1 = _sum_splits(sum1_ptr, c, c_ok, n_splits, C, ACC, BLOCK_C) / count
        s2 = _sum_splits(sum2_ptr, c, c_ok, n_splits, C, ACC, BLOCK_C) / count
        mean = shift + s1
        var = tl.maximum(s2 - s1 * s1, 0.0)
        if HAS_RUNNING:
            rm = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
            rv = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
            unbiased = var * (count / (count - 1.0))
            tl.store(running_mean_ptr + c, (1.0 - momentum) * rm + momentum * mean, mask=c_ok)
            tl.store(running_var_ptr + c, (1.0 - momentum) * rv + momentum * unbiased, mask=c_ok)
    else:
        mean = tl.load(running_mean_ptr + c, mask=c_ok).to(ACC)
        var = tl.load(running_var_ptr + c, mask=c_ok).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + c, mask=c_ok).to(ACC)
    b = -mean * a
    if HAS_BIAS:
        b += tl.load(bias_ptr + c, mask=c_ok).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)
    tl.store(a_ptr + c, a, mask=c_ok)
    tl.store(b_ptr + c, b, mask=c_ok)


@triton.jit
def _finalize_backward(
    sum1_ptr, sum2_ptr, n_splits, count,
    weight_ptr, mean_ptr, invstd_ptr,
    grad_weight_ptr, grad_bias_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    C,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel: grad_weight = sum(g' * xhat), grad_bias = sum(g'), and dx = g' * alpha + x * beta + gamma."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_g = _sum_splits(sum1_ptr, c, c_ok, n_splits, C, ACC, BLOCK_C)
    sum_gx = _sum_splits(sum2_ptr, c, c_ok, n_splits, C, ACC, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    if GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_gx * invstd, mask=c_ok)
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_g, mask=c_ok)
    alpha = invstd
    if HAS_WEIGHT:
        alpha = alpha * tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if TRAINING:
        beta = -alpha * invstd * invstd * sum_gx / count
        gamma = -alpha * sum_g / count - mean * beta
    else:
        beta = tl.zeros((BLOCK_C,), ACC)
        gamma = tl.zeros((BLOCK_C,), ACC)
    tl.store(alpha_ptr + c, alpha, mask=c_ok)
    tl.store(beta_ptr + c, beta, mask=c_ok)
    tl.store(gamma_ptr + c, gamma, mask=c_ok)


@triton.jit
def _apply(
    x_ptr, g_ptr, out_ptr, a_ptr, b_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    R, K, C,
    ACC: tl.constexpr, CHANNEL_MINOR: tl.constexpr, BACKWARD: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: out = x * a + b (ReLU'd). Backward: out = g' * alpha + x * beta + gamma."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    if CHANNEL_MINOR:
        ch = tl.broadcast_to(k[None, :], (BLOCK_R, BLOCK_K))
    else:
        ch = tl.broadcast_to((r % C)[:, None], (BLOCK_R, BLOCK_K))
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + ch, mask=mask, other=0.0)
    b = tl.load(b_ptr + ch, mask=mask, other=0.0)
    if BACKWARD:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = tl.where(x * a + b > 0, g, 0.0)
        alpha = tl.load(alpha_ptr + ch, mask=mask, other=0.0)
        beta = tl.load(beta_ptr + ch, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + ch, mask=mask, other=0.0)
        y = g * alpha + x * beta + gamma
    else:
        y = x * a + b
        if RELU:
            y = tl.maximum(y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return _TL_ACC.get(dtype, tl.float32)


def _geometry(x: torch.Tensor, channel_minor: bool) -> tuple[int, int, int, int]:
    """(N, C, R, K) of the row-major [R, K] view described in the module docstring."""
    n, c = x.shape[0], x.shape[1]
    spatial = x.numel() // max(n * c, 1)
    return (n, c, n * spatial, c) if channel_minor else (n, c, n * c, spatial)


def _reduce(x, g, shift, a, b, channel_minor: bool, backward: bool, relu: bool):
    """Per-channel partial sums, one row per split: returns (sum1 [splits, C], sum2 [splits, C])."""
    n, c, rows, k = _geometry(x, channel_minor)
    acc = _acc_dtype(x.dtype)
    target = 4 * sm_count(x.device)  # enough programs to fill the card a few times over
    g = x if g is None else g
    if channel_minor:
        block_c = min(next_pow2(c), 64)
        block_r = max(16, 4096 // block_c)
        c_blocks = triton.cdiv(c, block_c)
        splits = max(1, min(triton.cdiv(target, c_blocks), triton.cdiv(rows, block_r)))
        rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
        splits = triton.cdiv(rows, rows_per_split)
        grid = (c_blocks, splits)
    else:
        block_k = min(next_pow2(k), 1024)
        block_n = max(1, min(next_pow2(n), 4096 // block_k))
        splits = max(1, min(triton.cdiv(target, c), n))
        n_per_split = triton.cdiv(n, splits)
        splits = triton.cdiv(n, n_per_split)
        grid = (c, splits)
    sum1 = torch.empty((splits, c), device=x.device, dtype=acc)
    sum2 = torch.empty((splits, c), device=x.device, dtype=acc)
    common = dict(ACC=_tl_acc(x.dtype), BACKWARD=backward, RELU=relu)
    if channel_minor:
        _reduce_channel_minor[grid](
            x, g, shift, a, b, sum1, sum2, rows, c, rows_per_split, **common,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps_for(block_r * block_c),
        )
    else:
        _reduce_channel_major[grid](
            x, g, shift, a, b, sum1, sum2, n, c, k, n_per_split, **common,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps_for(block_n * block_k),
        )
    return sum1, sum2


def _apply_launch(x, g, out, coeffs, channel_minor: bool, backward: bool, relu: bool):
    _, c, rows, k = _geometry(x, channel_minor)
    block_k = min(next_pow2(k), 1024)
    block_r = max(1, min(next_pow2(rows), 4096 // block_k))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    _apply[grid](
        x, x if g is None else g, out, *coeffs, rows, k, c,
        ACC=_tl_acc(x.dtype), CHANNEL_MINOR=channel_minor, BACKWARD=backward, RELU=relu,
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
    """Returns (out, mean, invstd); updates running stats in place when training. ``x`` is dense in its layout."""
    n, c, rows, k = _geometry(x, channel_minor)
    acc = _acc_dtype(x.dtype)
    mean, invstd, a, b = (torch.empty(c, device=x.device, dtype=acc) for _ in range(4))
    if training:
        sum1, sum2 = _reduce(x, None, x, x, x, channel_minor, backward=False, relu=False)
        n_splits, count = sum1.shape[0], rows * k // c
    else:
        sum1 = sum2 = mean  # not read in eval
        n_splits, count = 0, 0
    has_running = running_mean is not None
    block_c = _block_c(c)
    _finalize_forward[(triton.cdiv(c, block_c),)](
        x, sum1, sum2, n_splits, float(count), 1 if channel_minor else k,
        weight if weight is not None else mean, bias if bias is not None else mean,  # placeholders are not read
        running_mean if has_running else mean, running_var if has_running else mean,
        mean, invstd, a, b,
        c, momentum, eps,
        ACC=_tl_acc(x.dtype), TRAINING=training, HAS_RUNNING=has_running,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c,
    )
    out = torch.empty_like(x)
    _apply_launch(x, None, out, (a, b, a, a, a), channel_minor, False, relu)
    return out, mean, invstd


def batch_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
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
    coeffs = torch.empty((5, c), device=x.device, dtype=acc)  # a, b (forward, for ReLU's mask), alpha, beta, gamma
    if relu:  # the forward's y = x * a + b, recomputed from the saved statistics
        coeffs[0] = invstd if weight is None else invstd * weight.to(acc)
        coeffs[1] = -mean * coeffs[0]
        if bias is not None:
            coeffs[1] += bias.to(acc)
    sum1, sum2 = _reduce(x, grad_out, mean, coeffs[0], coeffs[1], channel_minor, backward=True, relu=relu)
    grad_weight = torch.empty(c, device=x.device, dtype=acc) if need_weight_grad else None
    grad_bias = torch.empty(c, device=x.device, dtype=acc) if need_bias_grad else None
    block_c = _block_c(c)
    _finalize_backward[(triton.cdiv(c, block_c),)](
        sum1, sum2, sum1.shape[0], float(rows * k // c),
        weight if weight is not None else coeffs, mean, invstd,
        grad_weight if need_weight_grad else coeffs, grad_bias if need_bias_grad else coeffs,
        coeffs[2], coeffs[3], coeffs[4],
        c,
        ACC=_tl_acc(x.dtype), TRAINING=training, HAS_WEIGHT=weight is not None,
        GRAD_WEIGHT=need_weight_grad, GRAD_BIAS=need_bias_grad, BLOCK_C=block_c,
    )
    grad_input = None
    if need_input_grad:
        grad_input = torch.empty_like(x)
        _apply_launch(x, grad_out, grad_input, tuple(coeffs), channel_minor, True, relu)
    return grad_input, grad_weight, grad_bias
