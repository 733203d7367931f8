"""conv2d + bias + ReLU + max/avg pool in Triton: implicit GEMM (no im2col buffer), forward and backward.

Tensors are read and written through their (N, C, H, W) strides: channels_last is the fast layout (channels are the
contiguous GEMM reduction dim); under the interpreter NCHW and other strides are read in place, on the GPU an input
whose channels are not contiguous is read through one channels_last copy (``readable_input``). Accumulation is fp32; operands are
fp16/bf16 (fp32 as TF32 on the GPU, IEEE under the interpreter). Offsets are 64-bit at the batch dim; one sample's
tensor (C*H*W elements) must stay below 2^31 (dlkernels.ops.conv sends larger ones to the reference).

Forward (``_conv_forward``): a program owns BLOCK_M pooled output pixels x BLOCK_N output channels. It loops over
the pooling window's positions; for each it computes the conv tile of those pixels' window position (GEMM over
K = KH*KW*C_in), adds the bias, applies ReLU and folds it into a running max (with its window position) or sum, so
the full-resolution activation only lives in registers. Windows that overlap (AlexNet's 3x3 stride 2) are
recomputed per pooled output (9/4 of the conv FLOPs there); non-overlapping windows (VGG, LeNet) cost nothing extra.
The reduction loops over taps (kh, kw) and BLOCK_K channels when C_in is a multiple of 16, else over the flattened
K = (kh, kw, c) in BLOCK_K steps (C_in = 1 or 3 fills the dot's K instead of padding each tap to 16).

Backward: the gradient at the conv output, dz = route(grad_out) (the pooled gradient sent to the saved max position
or spread over the window, times ReLU's mask), is formed by ``_dz_tile`` from grad_out and the saved per-window code
(dlkernels.ops.conv); without a pool the GEMM kernels read it directly from grad_out (and the output, for ReLU's
mask), with a pool ``_route`` writes it once to a transient buffer that both GEMMs read.
- grad input (``_conv_dgrad``): the transposed conv as an implicit GEMM over input pixels x C_in with K = KH*KW*C_out;
  pixels are grouped by their residue modulo the stride (grid axis 2), so for each tap either every pixel of the
  tile has an output pixel behind it or none does: strided convs skip whole taps instead of masking 1 - 1/s^2 of K.
- grad weight and bias (``_conv_wgrad``): GEMM of C_out x (KH*KW*C_in) over all output pixels, split over pixel
  ranges into fp32 partial sums (summed after); the programs of the first K block also sum dz for the bias.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import store_rounded
from .launch import (conv_flat_k, conv_gemm_config, conv_route_config, conv_wgrad_config, gpu_launch_config,
                     next_pow2, sm_count)

POOL_NONE, POOL_MAX, POOL_AVG = 0, 1, 2


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b. UPCAST: bf16 under the interpreter, which cannot do bf16 arithmetic, goes through fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, x_row, oh, ow, row_ok, co, co_ok,
    C, H, W, CO, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW,
    FLAT_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] conv outputs at pixels (oh, ow) of the samples whose offsets are ``x_row``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    kk = tl.arange(0, BLOCK_K)
    if FLAT_K:
        K = C * KH * KW
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            ci = k % C
            tap = k // C
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + x_row[:, None] + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
            b = tl.load(w_ptr + k[:, None] * CO + co[None, :], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, PRECISION)
    else:
        for tap in range(0, KH * KW):
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_row = x_row + ih * sxh + iw * sxw
            for c0 in range(0, C, BLOCK_K):
                ci = c0 + kk
                c_ok = ci < C
                a = tl.load(x_ptr + a_row[:, None] + ci[None, :] * sxc, mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + (tap * C + ci)[:, None] * CO + co[None, :], mask=c_ok[:, None] & co_ok[None, :],
                            other=0.0)
                acc = _dot(a, b, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _conv_forward(
    x_ptr, w_ptr, b_ptr, out_ptr, code_ptr,
    C, H, W, CO, PH, PW, M,
    sxn, sxc, sxh, sxw, son, soc, soh, sow, scn, scc, sch, scw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, PKH, PKW, PSH, PSW,
    POOL: tl.constexpr, RELU: tl.constexpr, HAS_BIAS: tl.constexpr, FLAT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    co_ok = co < CO
    pw = rows % PW
    ph = (rows // PW) % PH
    n = (rows // PW // PH).to(tl.int64)
    x_row = n * sxn
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), tl.float32)
    if POOL == 1:
        result = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    else:
        result = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    code = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for pos in range(0, PKH * PKW):
        oh = ph * PSH + pos // PKW
        ow = pw * PSW + pos % PKW
        z = _conv_tile(
            x_ptr, w_ptr, x_row, oh, ow, row_ok, co, co_ok, C, H, W, CO, sxc, sxh, sxw,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, FLAT_K, UPCAST, PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K,
        ) + bias[None, :]
        if RELU:
            z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
        if POOL == 1:
            take = (z > result) | (z != z)  # first maximum wins; a NaN wins (the last one), as torch's max_pool2d
            result = tl.where(take, z, result)
            code = tl.where(take, pos, code)
        elif POOL == 2:
            result += z
            if RELU:
                code = code | ((z > 0.0).to(tl.int32) << pos)
        else:
            result = z
    if POOL == 2:
        result = result / (PKH * PKW)
    mask = row_ok[:, None] & co_ok[None, :]
    out_offs = (n * son + ph * soh + pw * sow)[:, None] + co[None, :] * soc
    store_rounded(out_ptr, out_offs, result, mask)
    if POOL == 1 or (POOL == 2 and RELU):
        if POOL == 1 and RELU:
            code = tl.where(result > 0.0, code, -1)  # ReLU zeroed the window: no gradient
        code_offs = (n * scn + ph * sch + pw * scw)[:, None] + co[None, :] * scc
        tl.store(code_ptr + code_offs, code.to(code_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz_tile(
    g_ptr, code_ptr, y_ptr, n, oh, ow, row_ok, co, co_ok,
    sgn, sgc, sgh, sgw, scn, scc, sch, scw, syn, syc, syh, syw,
    PH, PW, PKH, PKW, PSH, PSW, NWH, NWW,
    POOL: tl.constexpr, RELU: tl.constexpr,
):
    """fp32 gradient at conv outputs (n, oh, ow) x channels co: grad_out routed back through the pool and ReLU."""
    if POOL == 0:
        mask = row_ok[:, None] & co_ok[None, :]
        g = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + co[None, :] * sgc, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + co[None, :] * syc, mask=mask, other=0.0)
            g = tl.where(y.to(tl.float32) > 0.0, g, 0.0)
        return g
    dz = tl.zeros((oh.shape[0], co.shape[0]), tl.float32)
    # The windows holding (oh, ow): at most NWH = ceil(PKH / PSH) by NWW of them.
    for dh in range(0, NWH):
        ph = oh // PSH - dh
        ok_h = (ph >= 0) & (ph < PH) & (oh - ph * PSH < PKH)
        for dw in range(0, NWW):
            pw = ow // PSW - dw
            ok = row_ok & ok_h & (pw >= 0) & (pw < PW) & (ow - pw * PSW < PKW)
            mask = ok[:, None] & co_ok[None, :]
            g = tl.load(g_ptr + (n * sgn + ph * sgh + pw * sgw)[:, None] + co[None, :] * sgc, mask=mask, other=0.0)
            g = g.to(tl.float32)
            pos = (oh - ph * PSH) * PKW + (ow - pw * PSW)
            code_offs = (n * scn + ph * sch + pw * scw)[:, None] + co[None, :] * scc
            if POOL == 1:
                code = tl.load(code_ptr + code_offs, mask=mask, other=-1).to(tl.int32)
                dz += tl.where(code == pos[:, None], g, 0.0)
            else:
                if RELU:
                    bits = tl.load(code_ptr + code_offs, mask=mask, other=0).to(tl.int32)
                    g = tl.where(((bits >> pos[:, None]) & 1) != 0, g, 0.0)
                dz += g / (PKH * PKW)
    return dz


@triton.jit
def _route(
    g_ptr, code_ptr, dz_ptr, CO, OH, OW, PH, PW, M,
    sgn, sgc, sgh, sgw, scn, scc, sch, scw,
    PKH, PKW, PSH, PSW, NWH, NWW,
    POOL: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz [N, OH, OW, CO] (dense, grad_out's dtype) from the pooled gradient and the saved codes."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    co_ok = co < CO
    ow = rows % OW
    oh = (rows // OW) % OH
    n = (rows // OW // OH).to(tl.int64)
    dz = _dz_tile(g_ptr, code_ptr, g_ptr, n, oh, ow, row_ok, co, co_ok, sgn, sgc, sgh, sgw, scn, scc, sch, scw,
                  0, 0, 0, 0, PH, PW, PKH, PKW, PSH, PSW, NWH, NWW, POOL, RELU)
    store_rounded(dz_ptr, rows.to(tl.int64)[:, None] * CO + co[None, :], dz, row_ok[:, None] & co_ok[None, :])


@triton.jit
def _conv_dgrad(
    g_ptr, y_ptr, w_ptr, dx_ptr,
    C, H, W, CO, OH, OW, HQ, WQ, M,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW,
    RELU: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[n, ci, ih, iw] = sum over taps and output channels of dz[n, co, oh, ow] * w[co, ci, kh, kw] with
    oh * stride_h = ih + pad_h - kh * dil_h. Program (m, ci block, residue): input pixels ih = qh * stride_h + rh."""
    rh = tl.program_id(2) // stride_w
    rw = tl.program_id(2) % stride_w
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < C
    ih = ((rows // WQ) % HQ) * stride_h + rh
    iw = (rows % WQ) * stride_w + rw
    n = (rows // WQ // HQ).to(tl.int64)
    row_ok = (rows < M) & (ih < H) & (iw < W)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        # Every pixel of this residue class has the same remainders: the whole tap is in or out.
        if ((rh + pad_h - kh * dil_h) % stride_h == 0) & ((rw + pad_w - kw * dil_w) % stride_w == 0):
            th = ih + pad_h - kh * dil_h
            tw = iw + pad_w - kw * dil_w
            oh = th // stride_h
            ow = tw // stride_w
            ok = row_ok & (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
            for co0 in range(0, CO, BLOCK_K):
                co = co0 + kk
                co_ok = co < CO
                dz = _dz_tile(g_ptr, g_ptr, y_ptr, n, oh, ow, ok, co, co_ok, sgn, sgc, sgh, sgw, 0, 0, 0, 0,
                              syn, syc, syh, syw, 0, 0, 1, 1, 1, 1, 1, 1, 0, RELU)
                b = tl.load(w_ptr + (tap * CO + co)[:, None] * C + ci[None, :], mask=co_ok[:, None] & ci_ok[None, :],
                            other=0.0)
                if not UPCAST:  # (UPCAST keeps dz in fp32: the interpreter truncates casts to bf16)
                    dz = dz.to(w_ptr.dtype.element_ty)
                acc = _dot(dz, b, acc, UPCAST, PRECISION)
    offs = (n * sdn + ih * sdh + iw * sdw)[:, None] + ci[None, :] * sdc
    store_rounded(dx_ptr, offs, acc, row_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_wgrad(
    g_ptr, y_ptr, x_ptr, part_ptr, bias_part_ptr,
    C, H, W, CO, OH, OW, P, pixels_per_split,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW,
    RELU: tl.constexpr, HAS_BIAS: tl.constexpr, FLAT_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split, co, (kh, kw, ci)] = sum over this split's output pixels of dz[p, co] * x[p shifted by the tap, ci];
    bias_part[split, co] = sum of dz (programs of the first K block)."""
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    co_ok = co < CO
    K = KH * KW * C
    if FLAT_K:
        k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        ci = k % C
        kh = (k // C) // KW
        kw = (k // C) % KW
        k_ok = k < K
    else:
        c_blocks = tl.cdiv(C, BLOCK_N)
        tap = pid_k // c_blocks
        ci = (pid_k % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        kh = tap // KW
        kw = tap % KW
        k_ok = ci < C
        k = tap * C + ci
    p_start = split * pixels_per_split
    p_end = tl.minimum(p_start + pixels_per_split, P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), tl.float32)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_end
        ow = p % OW
        oh = (p // OW) % OH
        n = (p // OW // OH).to(tl.int64)
        dz = _dz_tile(g_ptr, g_ptr, y_ptr, n, oh, ow, p_ok, co, co_ok, sgn, sgc, sgh, sgw, 0, 0, 0, 0,
                      syn, syc, syh, syw, 0, 0, 1, 1, 1, 1, 1, 1, 0, RELU)  # [BLOCK_K, BLOCK_M]
        if HAS_BIAS:
            bias_acc += tl.sum(dz, axis=0)
        if FLAT_K:
            ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
            iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
            ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_offs = (n * sxn)[:, None] + ci[None, :] * sxc + ih * sxh + iw * sxw
        else:
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = (p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & k_ok[None, :]
            x_offs = (n * sxn + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc
        xt = tl.load(x_ptr + x_offs, mask=ok, other=0.0)
        if not UPCAST:
            dz = dz.to(x_ptr.dtype.element_ty)
        acc = _dot(tl.trans(dz), xt, acc, UPCAST, PRECISION)
    part = part_ptr + split.to(tl.int64) * CO * K
    tl.store(part + co[:, None] * K + k[None, :], acc, mask=co_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        tl.store(bias_part_ptr + split * CO + co, bias_acc, mask=co_ok & (pid_k == 0))


# ---------------------------------------------------------------------------------------------------------------
# Launchers.


def _dot_options(x: torch.Tensor) -> dict:
    on_gpu = gpu_launch_config(x.device)  # (also when recording GPU launches under the interpreter)
    return dict(UPCAST=x.dtype == torch.bfloat16 and not on_gpu, PRECISION="tf32" if on_gpu else "ieee")


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def readable_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the GEMMs read it. On the GPU an input whose channels are not contiguous (NCHW) is copied once to
    channels_last (2 x its bytes; reading NCHW in place would make every A-tile load a scalar 2-byte gather); under
    the interpreter it is read in place through its strides."""
    if gpu_launch_config(x.device) and x.stride(1) != 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def pack_weight(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The weight as the GEMM's B operand, output channels contiguous: [KH, KW, C_in, C_out] (forward) or, for the
    transposed conv, [KH, KW, C_out, C_in]. One small copy per call; OIHW strides would make every B load scalar."""
    return weight.permute(2, 3, 0, 1).contiguous() if transposed else weight.permute(2, 3, 1, 0).contiguous()


def conv_forward(x, weight, bias, out, code, stride, padding, dilation, relu: bool, pool) -> None:
    """Fills ``out`` (N, CO, PH, PW) and, where the pool saves one, ``code`` (dlkernels.ops.conv)."""
    x = readable_input(x)
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    ph, pw = out.shape[2:]
    kind, pkh, pkw, psh, psw = pool
    m = n * ph * pw
    cfg = conv_gemm_config(x.device, m, c, co, x.dtype, pooled=kind != POOL_NONE)
    saves_code = code.numel() > 0
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(co, cfg["BLOCK_N"]))
    _conv_forward[grid](
        x, pack_weight(weight), x if bias is None else bias.contiguous(), out, code if saves_code else out,
        c, h, w, co, ph, pw, m,
        *_strides(x), *_strides(out), *(_strides(code) if saves_code else (0, 0, 0, 0)),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kh, kw, pkh, pkw, psh, psw,
        POOL=kind, RELU=relu, HAS_BIAS=bias is not None, FLAT_K=conv_flat_k(c), **_dot_options(x), **cfg,
    )


def _route_launch(grad_out, code, oh, ow, relu: bool, pool) -> torch.Tensor:
    """dz as a dense [N, OH, OW, CO] tensor viewed as (N, CO, OH, OW) (channels_last strides)."""
    n, co, ph, pw = grad_out.shape
    kind, pkh, pkw, psh, psw = pool
    dz = torch.empty((n, oh, ow, co), device=grad_out.device, dtype=grad_out.dtype)
    m = n * oh * ow
    block_m, block_n, options = conv_route_config(grad_out.device, m, co)
    has_code = code.numel() > 0
    _route[(triton.cdiv(m, block_m), triton.cdiv(co, block_n))](
        grad_out, code if has_code else grad_out, dz, co, oh, ow, ph, pw, m,
        *_strides(grad_out), *(_strides(code) if has_code else (0, 0, 0, 0)),
        pkh, pkw, psh, psw, triton.cdiv(pkh, psh), triton.cdiv(pkw, psw),
        POOL=kind, RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n, **options,
    )
    return dz.permute(0, 3, 1, 2)


def conv_backward(grad_out, x, weight, out, code, stride, padding, dilation, relu: bool, pool, output_mask):
    """(grad_input, grad_weight, grad_bias), None where ``output_mask`` is False."""
    x_read = readable_input(x) if output_mask[1] or output_mask[2] else x
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if pool[0] != POOL_NONE:
        g, relu_mask = _route_launch(grad_out, code, oh, ow, relu, pool), False
    else:
        g, relu_mask = grad_out, relu
    y = out if relu_mask else g
    dots = _dot_options(x)
    geometry = (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kh, kw)
    dx = dw = db = None
    if output_mask[0]:
        dx = torch.empty_like(x)
        hq, wq = triton.cdiv(h, stride[0]), triton.cdiv(w, stride[1])
        m = n * hq * wq
        cfg = conv_gemm_config(x.device, m, co, c, x.dtype)
        cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"] if not conv_flat_k(co) else 64, next_pow2(co)))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c, cfg["BLOCK_N"]), stride[0] * stride[1])
        _conv_dgrad[grid](
            g, y, pack_weight(weight, transposed=True), dx, c, h, w, co, oh, ow, hq, wq, m,
            *_strides(g), *_strides(y), *_strides(dx), *geometry,
            RELU=relu_mask, **dots, **cfg,
        )
    if output_mask[1] or output_mask[2]:
        cfg = conv_wgrad_config(x.device, co, c, x.dtype)
        k_total = kh * kw * c
        k_blocks = triton.cdiv(k_total, cfg["BLOCK_N"]) if conv_flat_k(c) else kh * kw * triton.cdiv(c, cfg["BLOCK_N"])
        tiles = triton.cdiv(co, cfg["BLOCK_M"]) * k_blocks
        pixels = n * oh * ow
        splits = max(1, min(triton.cdiv(4 * sm_count(x.device), tiles), triton.cdiv(pixels, 8 * cfg["BLOCK_K"])))
        per_split = triton.cdiv(triton.cdiv(pixels, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        splits = triton.cdiv(pixels, per_split)
        part = torch.empty((splits, co, k_total), device=x.device, dtype=torch.float32)
        bias_part = torch.empty((splits, co), device=x.device, dtype=torch.float32)
        _conv_wgrad[(triton.cdiv(co, cfg["BLOCK_M"]), k_blocks, splits)](
            g, y, x_read, part, bias_part, c, h, w, co, oh, ow, pixels, per_split,
            *_strides(g), *_strides(y), *_strides(x_read), *geometry,
            RELU=relu_mask, HAS_BIAS=bool(output_mask[2]), FLAT_K=conv_flat_k(c), **dots, **cfg,
        )
        if output_mask[1]:
            dw = torch.empty_like(weight)
            dw.copy_(part.sum(0).view(co, kh, kw, c).permute(0, 3, 1, 2))
        if output_mask[2]:
            db = bias_part.sum(0).to(weight.dtype)
    return dx, dw, db
