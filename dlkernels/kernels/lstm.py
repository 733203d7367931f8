"""LSTM in Triton: the fused cell (forward and backward) and the per-step engine around it; the call path of the
persistent CUDA engine (``dlkernels._C``, csrc/lstm/).

Cell forward, per (row b, hidden unit j): the four pre-activations gx + gh (gates i, f, g, o at columns j, H + j,
2H + j, 3H + j of a (B, 4H) row), the nonlinearities, c = f * c_prev + i * g and h = o * tanh(c) in fp32, h stored
in its dtype (rounded to nearest even), the post-activation gates and c saved in fp32 for backward. With
``lengths``, rows at t >= lengths[b] keep their h and c and get y = 0.
Cell backward: from dh (and the step's output gradient), dc and the saved gates, the gradient of the four
pre-activations and of c_prev; rows past their length pass dh and dc through unchanged.

Per-step engine (one layer-direction, T steps): per step one GEMM h @ W_hh^T (torch, cuBLAS) and one cell launch
(plus the projection GEMM when proj_size > 0); backward per step one cell-backward launch and one GEMM
dgates @ W_hh in fp32; the weight gradients are two large GEMMs after the loop.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..ops.lstm import reverse_time
from .launch import lstm_cell_blocks


# Written without nested @triton.jit helpers (tl.sigmoid, store_rounded): Triton's interpreter spends ~1.5 ms on
# each nested call, which per step and per launch is most of the CPU tests' time; on the GPU they inline alike.
# sigmoid(x) = 1 / (1 + exp(-x)); tanh(x) = 2 sigmoid(2x) - 1 (exact to ~1 ulp of 1, saturating cleanly).
# bf16 stores are rounded to nearest even by hand (the interpreter truncates fp32 -> bf16 casts), as
# dlkernels.kernels.common.store_rounded does.


@triton.jit(do_not_specialize=["t"])  # the step index changes every launch: one compiled kernel for all
def _cell_forward(
    gx_ptr, gh_ptr, c_in_ptr, c_out_ptr, h_out_ptr, y_ptr, gates_ptr, c_save_ptr, lengths_ptr,
    t, B, H, stride_gx, stride_gh,
    HAS_LENGTHS: tl.constexpr, WRITE_Y: tl.constexpr, SAVE: tl.constexpr, H_BF16: tl.constexpr,
    C_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    gx = gx_ptr + r64 * stride_gx + cols[None, :]
    gh = gh_ptr + r64 * stride_gh + cols[None, :]
    i = tl.load(gx, mask=mask, other=0.0).to(tl.float32) + tl.load(gh, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(gx + H, mask=mask, other=0.0).to(tl.float32) + tl.load(gh + H, mask=mask, other=0.0).to(tl.float32)
    g = (tl.load(gx + 2 * H, mask=mask, other=0.0).to(tl.float32)
         + tl.load(gh + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = (tl.load(gx + 3 * H, mask=mask, other=0.0).to(tl.float32)
         + tl.load(gh + 3 * H, mask=mask, other=0.0).to(tl.float32))
    i = 1.0 / (1.0 + tl.exp(-i))
    f = 1.0 / (1.0 + tl.exp(-f))
    g = 2.0 / (1.0 + tl.exp(-2.0 * g)) - 1.0
    o = 1.0 / (1.0 + tl.exp(-o))
    state = r64 * H + cols[None, :]
    c_prev = tl.load(c_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    c = f * c_prev + i * g
    h = o * (2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0)
    if H_BF16:
        bits = h.to(tl.uint32, bitcast=True)
        h = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    if HAS_LENGTHS:
        active = (t < tl.load(lengths_ptr + rows, mask=rows < B, other=0))[:, None]
        c = tl.where(active, c, c_prev)
        if WRITE_Y:
            tl.store(y_ptr + state, tl.where(active, h, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
            h = tl.where(active, h, tl.load(h_out_ptr + state, mask=mask, other=0.0).to(tl.float32))
    elif WRITE_Y:
        tl.store(y_ptr + state, h.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + state, h.to(h_out_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        gates = gates_ptr + r64 * (4 * H) + cols[None, :]
        tl.store(gates, i, mask=mask)
        tl.store(gates + H, f, mask=mask)
        tl.store(gates + 2 * H, g, mask=mask)
        tl.store(gates + 3 * H, o, mask=mask)
        tl.store(c_save_ptr + state, c, mask=mask)
    if C_BF16:
        bits = c.to(tl.uint32, bitcast=True)
        c = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(c_out_ptr + state, c.to(c_out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["t"])
def _cell_backward(
    dh_ptr, gy_ptr, dc_in_ptr, dc_out_ptr, gates_ptr, c_prev_ptr, c_ptr, dgates_ptr, keep_ptr, lengths_ptr,
    t, B, H,
    HAS_GY: tl.constexpr, HAS_C: tl.constexpr, HAS_LENGTHS: tl.constexpr, WRITE_KEEP: tl.constexpr,
    DGATES_BF16: tl.constexpr, DC_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    state = r64 * H + cols[None, :]
    gates = gates_ptr + r64 * (4 * H) + cols[None, :]
    i = tl.load(gates, mask=mask, other=0.0)
    f = tl.load(gates + H, mask=mask, other=0.0)
    g = tl.load(gates + 2 * H, mask=mask, other=0.0)
    o = tl.load(gates + 3 * H, mask=mask, other=0.0)
    c_prev = tl.load(c_prev_ptr + state, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        c = tl.load(c_ptr + state, mask=mask, other=0.0)
    else:
        c = f * c_prev + i * g
    dh = tl.load(dh_ptr + state, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        active = (t < tl.load(lengths_ptr + rows, mask=rows < B, other=0))[:, None]
    else:
        active = (rows >= 0)[:, None]
    if HAS_GY:
        dh += tl.where(active, tl.load(gy_ptr + state, mask=mask, other=0.0).to(tl.float32), 0.0)
    tanh_c = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c)
    di = tl.where(active, dc_total * g * i * (1.0 - i), 0.0)
    df = tl.where(active, dc_total * c_prev * f * (1.0 - f), 0.0)
    dg = tl.where(active, dc_total * i * (1.0 - g * g), 0.0)
    do = tl.where(active, dh * tanh_c * o * (1.0 - o), 0.0)
    dc_prev = tl.where(active, dc_total * f, dc)
    if DGATES_BF16:
        bits = di.to(tl.uint32, bitcast=True)
        di = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = df.to(tl.uint32, bitcast=True)
        df = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = dg.to(tl.uint32, bitcast=True)
        dg = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = do.to(tl.uint32, bitcast=True)
        do = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    if DC_BF16:
        bits = dc_prev.to(tl.uint32, bitcast=True)
        dc_prev = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    dgates = dgates_ptr + r64 * (4 * H) + cols[None, :]
    out_ty = dgates_ptr.dtype.element_ty
    tl.store(dgates, di.to(out_ty), mask=mask)
    tl.store(dgates + H, df.to(out_ty), mask=mask)
    tl.store(dgates + 2 * H, dg.to(out_ty), mask=mask)
    tl.store(dgates + 3 * H, do.to(out_ty), mask=mask)
    tl.store(dc_out_ptr + state, dc_prev.to(dc_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_KEEP:
        tl.store(keep_ptr + state, tl.where(active, 0.0, dh), mask=mask)


def _grid(batch: int, hidden: int):
    block_b, block_h, warps = lstm_cell_blocks(batch, hidden)
    return (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h)), dict(BLOCK_B=block_b, BLOCK_H=block_h,
                                                                             num_warps=warps)


def _launch_forward(gx, gh, c_in, c_out, h_out, *, y=None, gates=None, c_save=None, lengths=None, t=0):
    batch, hidden = c_out.shape
    grid, sizes = _grid(batch, hidden)
    _cell_forward[grid](
        gx, gh, c_in, c_out, h_out, h_out if y is None else y, c_out if gates is None else gates,
        c_out if c_save is None else c_save, c_out if lengths is None else lengths,
        t, batch, hidden, gx.stride(0), gh.stride(0),
        HAS_LENGTHS=lengths is not None, WRITE_Y=y is not None, SAVE=gates is not None,
        H_BF16=h_out.dtype == torch.bfloat16, C_BF16=c_out.dtype == torch.bfloat16, **sizes,
    )


def _launch_backward(dh, dc_in, dc_out, gates, c_prev, dgates, *, gy=None, c=None, keep=None, lengths=None, t=0):
    batch, hidden = dc_out.shape
    grid, sizes = _grid(batch, hidden)
    _cell_backward[grid](
        dh, dh if gy is None else gy, dc_in, dc_out, gates, c_prev, gates if c is None else c, dgates,
        dh if keep is None else keep, dh if lengths is None else lengths, t, batch, hidden,
        HAS_GY=gy is not None, HAS_C=c is not None, HAS_LENGTHS=lengths is not None, WRITE_KEEP=keep is not None,
        DGATES_BF16=dgates.dtype == torch.bfloat16, DC_BF16=dc_out.dtype == torch.bfloat16, **sizes,
    )


# ---------------------------------------------------------------------------------------------------------------
# One cell step (dlkernels.ops.lstm_cell).


def cell_forward(gx: torch.Tensor, gh: torch.Tensor, cx: torch.Tensor):
    """(h, c, gates): h, c in gx's dtype, gates post-activation fp32 (B, 4H). Inputs contiguous."""
    h, c = torch.empty_like(cx, dtype=gx.dtype), torch.empty_like(cx, dtype=gx.dtype)
    gates = torch.empty(gx.shape, device=gx.device, dtype=torch.float32)
    _launch_forward(gx, gh, cx, c, h, gates=gates, c_save=torch.empty_like(cx, dtype=torch.float32))
    return h, c, gates


def cell_backward(grad_h, grad_c, gates, cx, dtype):
    """(grad of the pre-activations (B, 4H) in ``dtype``, grad of cx in cx's dtype). Inputs contiguous."""
    d_pre = torch.empty(gates.shape, device=gates.device, dtype=dtype)
    dcx = torch.empty_like(cx)
    _launch_backward(grad_h, grad_c, dcx, gates, cx, d_pre)
    return d_pre, dcx


# ---------------------------------------------------------------------------------------------------------------
# The recurrence of one layer-direction (dlkernels::lstm_recurrence and its backward).


def _int32_lengths(lengths, device):
    return torch.empty(0, dtype=torch.int32, device=device) if lengths is None else lengths.to(device, torch.int32)


def recurrence_forward(engine, x_proj, w_hh, w_hr, h0, c0, lengths, reverse, training):
    """(y, h_n, c_n, gates, c_all) as ``dlkernels::lstm_recurrence`` documents, on ``engine`` ("per_step" or
    "persistent")."""
    dtype = x_proj.dtype
    steps, batch, four_h = x_proj.shape
    hidden = four_h // 4
    if reverse:
        x_proj = reverse_time(x_proj, lengths)
    x_proj = x_proj.contiguous()
    if engine == "persistent":
        from .. import _backend

        y, h, c, gates, c_all = _backend.cuda_extension().lstm_persistent_forward(
            x_proj, w_hh.contiguous(), h0.contiguous(), c0.float().contiguous(),
            _int32_lengths(lengths, x_proj.device), training,
        )
    else:
        y, h, c, gates, c_all = _per_step_forward(x_proj, w_hh, w_hr, h0, c0, lengths, training)
    if not training:
        gates, c_all = x_proj.new_empty(0, dtype=torch.float32), x_proj.new_empty(0, dtype=torch.float32)
    if reverse:
        y = reverse_time(y, lengths)
    return y, h, c.to(dtype), gates, c_all


@functools.cache
def _fp32_product_available(device_type: str) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` (fp16/bf16 operands, fp32 output) runs on this device type
    (CUDA builds of recent torch; not the CPU)."""
    try:
        a = torch.ones(16, 16, device=device_type, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32, out=torch.empty(16, 16, device=device_type))
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _per_step_forward(x_proj, w_hh, w_hr, h0, c0, lengths, training):
    steps, batch, four_h = x_proj.shape
    hidden, out = four_h // 4, h0.shape[1]
    # h @ W_hh^T straight to fp32 where torch can (no rounding of the recurrent product to fp16/bf16 before the add).
    fp32_product = x_proj.dtype in (torch.float16, torch.bfloat16) and _fp32_product_available(x_proj.device.type)
    y = x_proj.new_empty((steps, batch, out))
    h = h0.contiguous().clone()
    c = c0.to(torch.float32).contiguous().clone()
    gates = x_proj.new_empty((steps, batch, four_h), dtype=torch.float32) if training else None
    c_all = x_proj.new_empty((steps, batch, hidden), dtype=torch.float32) if training else None
    gh = x_proj.new_empty((batch, four_h), dtype=torch.float32 if fp32_product else x_proj.dtype)
    h_raw = x_proj.new_empty((batch, hidden)) if w_hr is not None else None
    w_hh_t, w_hr_t = w_hh.t(), (w_hr.t() if w_hr is not None else None)
    for t in range(steps):
        if fp32_product:
            torch.mm(h, w_hh_t, out_dtype=torch.float32, out=gh)
        else:
            torch.mm(h, w_hh_t, out=gh)
        _launch_forward(
            x_proj[t], gh, c, c, h if w_hr is None else h_raw, y=y[t] if w_hr is None else None,
            gates=gates[t] if training else None, c_save=c_all[t] if training else None, lengths=lengths, t=t,
        )
        if w_hr is not None:
            projected = torch.mm(h_raw, w_hr_t)
            if lengths is None:
                y[t] = projected
                h.copy_(projected)
            else:
                active = (t < lengths).unsqueeze(1)
                y[t] = torch.where(active, projected, 0.0)
                h.copy_(torch.where(active, projected, h))
    return y, h, c, gates, c_all


def recurrence_backward(engine, grad_y, grad_h_n, grad_c_n, x_proj, w_hh, w_hr, h0, c0, lengths, reverse, y, gates,
                        c_all):
    """(grad x_proj, grad w_hh, grad w_hr or empty, grad h0, grad c0) of ``dlkernels::lstm_recurrence``."""
    dtype = x_proj.dtype
    if reverse:
        grad_y, y = reverse_time(grad_y, lengths), reverse_time(y, lengths)
    c0_f32 = c0.to(torch.float32).contiguous()
    if engine == "persistent":
        from .. import _backend

        dgates, dh0, dc0 = _backend.cuda_extension().lstm_persistent_backward(
            grad_y.float().contiguous(), grad_h_n.float().contiguous(), grad_c_n.float().contiguous(),
            w_hh.contiguous(), gates, c_all, c0_f32, _int32_lengths(lengths, x_proj.device),
        )
        dh_projected = None
    else:
        dgates, dh0, dc0, dh_projected = _per_step_backward(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, c0_f32, lengths,
                                                            gates, c_all)
    grad_x = dgates.to(dtype)
    steps, batch, four_h = grad_x.shape
    out = h0.shape[1]
    # Weight gradients: two large GEMMs over all T*B rows, in the input dtype with fp32 accumulation (as cuDNN).
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).reshape(steps * batch, out)
    grad_w_hh = grad_x.reshape(steps * batch, four_h).t() @ h_prev
    grad_w_hr = w_hh.new_empty(0)
    if w_hr is not None:
        i, f, g, o = gates.chunk(4, dim=2)
        h_raw = (o * torch.tanh(c_all)).to(dtype).reshape(steps * batch, -1)
        grad_w_hr = dh_projected.to(dtype).reshape(steps * batch, out).t() @ h_raw
    if reverse:
        grad_x = reverse_time(grad_x, lengths)
    return grad_x, grad_w_hh, grad_w_hr, dh0.to(h0.dtype), dc0.to(c0.dtype)


def _per_step_backward(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, c0, lengths, gates, c_all):
    """(dgates (T, B, 4H) fp32, dh0, dc0 fp32, the gradient of each step's projected h (T, B, P), masked, or None)."""
    steps, batch, four_h = gates.shape
    grad_y = grad_y.contiguous()
    dh = grad_h_n.to(torch.float32).contiguous().clone()
    dc = grad_c_n.to(torch.float32).contiguous().clone()
    dgates = torch.empty_like(gates)
    w_hh32 = w_hh.to(torch.float32)
    if w_hr is None:
        keep = torch.empty_like(dh)
        for t in range(steps - 1, -1, -1):
            c_prev = c_all[t - 1] if t > 0 else c0
            _launch_backward(dh, dc, dc, gates[t], c_prev, dgates[t], gy=grad_y[t], c=c_all[t], keep=keep,
                             lengths=lengths, t=t)
            torch.addmm(keep, dgates[t], w_hh32, out=dh)
        return dgates, dh, dc, None
    w_hr32 = w_hr.to(torch.float32)
    gy = grad_y.to(torch.float32)
    if lengths is not None:
        active = (torch.arange(steps, device=gy.device).unsqueeze(1) < lengths).unsqueeze(2)  # (T, B, 1)
        gy = gy * active
    dh_projected = torch.empty_like(gy)
    for t in range(steps - 1, -1, -1):
        c_prev = c_all[t - 1] if t > 0 else c0
        dh_total = dh + gy[t]
        dh_raw = dh_total @ w_hr32
        _launch_backward(dh_raw, dc, dc, gates[t], c_prev, dgates[t], c=c_all[t], lengths=lengths, t=t)
        if lengths is None:
            dh_projected[t] = dh_total
            dh = dgates[t] @ w_hh32
        else:
            dh_projected[t] = dh_total * active[t]
            dh = torch.addmm(dh_total * ~active[t], dgates[t], w_hh32)
    return dgates, dh, dc, dh_projected
