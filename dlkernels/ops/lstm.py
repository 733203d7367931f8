"""LSTM as ``torch.library`` custom ops: one cell step, and one layer-direction over a whole sequence.

Public functions:

- ``lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None) -> (h, c)``: torch's ``lstm_cell``; the two gate
  GEMMs are torch matmuls, the gate math is the fused op ``dlkernels::lstm_cell_forward``.
- ``lstm_layer(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *, lengths=None, reverse=False)
  -> (output, h_n, c_n)``: one layer and direction over a time-major (T, B, I) sequence. The input projection of
  every step is one GEMM; the recurrence is the op ``dlkernels::lstm_recurrence``.
- ``lstm_layer_bidirectional(...)``: both directions of one layer, their input projections as one batched GEMM.

Semantics (torch's): gates i, f, g, o in that order along the 4H dim; c_t = f * c_{t-1} + i * g,
h_t = o * tanh(c_t), then h_t = W_hr h_t when ``w_hr`` (proj_size) is given. ``lengths`` (B,) gives each sequence's
length (any order): for t >= lengths[b] row b's state is left as it was (h_n, c_n are taken at its last valid
step) and output[t, b] is 0, as in a padded ``PackedSequence``. ``reverse`` runs each sequence backwards within its
length (the reverse direction of a bidirectional LSTM).

Precision: the cell state and the gate math are fp32 (fp64 for fp64 input) whatever the input dtype; h is rounded
to the input dtype each step and the recurrence uses the rounded h (as cuDNN does); c_n and the cell's c are
returned in the input dtype.

Engines for the recurrence (``dlkernels.kernels.launch.lstm_engine`` holds the table that picks one):
``reference`` (eager PyTorch loop: the CPU fallback, and fp64), ``per_step`` (a torch GEMM plus the fused Triton
cell per step; what Triton's interpreter tests), ``persistent`` (the CUDA kernel of ``dlkernels._C``, one launch
per layer-direction; see LSTM_CONTRACT in csrc/lstm/) and ``cudnn`` (torch's own LSTM, for shapes where our
engines are predicted slower; chosen by the modules and ``lstm_layer`` before any custom op runs).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend

OP = "lstm"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (eager PyTorch, differentiable by autograd): the CPU fallback, fp64, and the backward of
# the reference path (recomputed under autograd).


def reference_cell(gx: Tensor, gh: Tensor, cx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, c) in cx's dtype and the post-activation gates (acc dtype) of one step from gate pre-activations."""
    acc = _acc_dtype(gx.dtype)
    pre = gx.to(acc) + gh.to(acc)
    i, f, g, o = pre.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * cx.to(acc) + i * g
    h = o * torch.tanh(c)
    return h.to(gx.dtype), c.to(gx.dtype), torch.cat([i, f, g, o], dim=-1)


def time_reverse_index(steps: int, lengths: Optional[Tensor], batch: int, device) -> Tensor:
    """(T, B) time index that reverses each sequence within its length (positions past the length stay put).
    It is its own inverse."""
    t = torch.arange(steps, device=device).unsqueeze(1).expand(steps, batch)
    if lengths is None:
        return (steps - 1 - t).contiguous()
    n = lengths.to(device=device, dtype=torch.int64).unsqueeze(0)
    return torch.where(t < n, n - 1 - t, t)


def reverse_time(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``x`` (T, B, ...) with each sequence reversed within its length."""
    if lengths is None:
        return x.flip(0)
    index = time_reverse_index(x.shape[0], lengths, x.shape[1], x.device)
    return x.gather(0, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def reference_recurrence(x_proj, w_hh, w_hr, h0, c0, lengths, reverse):
    """(y, h_n, c_n, gates, c_all): the recurrence in eager PyTorch, in fp32 (fp64 for fp64), h rounded to the input
    dtype each step. Differentiable: the reference backward recomputes it under autograd."""
    dtype, acc = x_proj.dtype, _acc_dtype(x_proj.dtype)
    steps, batch = x_proj.shape[0], x_proj.shape[1]
    if reverse:
        x_proj = reverse_time(x_proj, lengths)
    whh, whr = w_hh.to(acc), (w_hr.to(acc) if w_hr is not None else None)
    h, c = h0.to(acc), c0.to(acc)
    ys, gates_all, cs = [], [], []
    for t in range(steps):
        pre = x_proj[t].to(acc) + h @ whh.t()
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = (o * torch.tanh(c_new)).to(dtype).to(acc)
        if whr is not None:
            h_new = (h_new @ whr.t()).to(dtype).to(acc)
        if lengths is not None:
            active = (t < lengths).unsqueeze(1)
            c_new = torch.where(active, c_new, c)
            ys.append(torch.where(active, h_new, 0.0))
            h_new = torch.where(active, h_new, h)
        else:
            ys.append(h_new)
        h, c = h_new, c_new
        gates_all.append(torch.cat([i, f, g, o], dim=-1))
        cs.append(c)
    y = torch.stack(ys) if steps else x_proj.new_zeros((0, batch, h0.shape[1]), dtype=acc)
    if reverse:
        y = reverse_time(y, lengths)
    gates = torch.stack(gates_all) if steps else x_proj.new_zeros((0, batch, x_proj.shape[2]), dtype=acc)
    c_all = torch.stack(cs) if steps else x_proj.new_zeros((0, batch, c0.shape[1]), dtype=acc)
    return y.to(dtype), h.to(dtype), c.to(dtype), gates, c_all


# ---------------------------------------------------------------------------------------------------------------
# Engine choice.


def _persistent_module():
    """``dlkernels._C`` when it carries the persistent LSTM kernels, else None."""
    ext = _backend.cuda_extension()
    return ext if ext is not None and hasattr(ext, "lstm_persistent_forward") else None


def persistent_available(hidden: int, batch: int, like: Tensor) -> bool:
    """Whether the persistent CUDA kernel takes (hidden, batch) in ``like``'s dtype on ``like``'s device."""
    ext = _persistent_module()
    if ext is None or like.device.type != "cuda" or like.dtype == torch.float64:
        return False
    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    return bool(ext.lstm_persistent_supported(hidden, batch, like.dtype, index))


def _persistent_supported(x_proj: Tensor, w_hr: Optional[Tensor]) -> bool:
    return w_hr is None and persistent_available(x_proj.shape[2] // 4, x_proj.shape[1], x_proj)


def _engine(x_proj: Tensor, w_hr: Optional[Tensor]) -> str:
    """``reference``, ``per_step`` or ``persistent`` for one call of the recurrence."""
    unsupported = "float64 inputs (the kernels are fp16/bf16/fp32)" if x_proj.dtype == torch.float64 else None
    impl = _backend.choose(OP, x_proj.device, has_cuda=True, unsupported=unsupported)
    if impl == "reference":
        return "reference"
    supported = _persistent_supported(x_proj, w_hr)
    if _backend.get_backend() == "cuda":
        if supported:
            return "persistent"
        why = "proj_size > 0" if w_hr is not None else f"batch {x_proj.shape[1]}, hidden {x_proj.shape[2] // 4}"
        if not _backend.triton_available():
            _backend.warn_fallback(OP, f"the persistent CUDA kernel does not take {why} and triton is not available")
            return "reference"
        if (OP, why) not in _backend._warned:  # once per reason, as _backend.warn_fallback
            _backend._warned.add((OP, why))
            warnings.warn(f"dlkernels.{OP}: the persistent CUDA kernel does not take {why}; using the per-step "
                          "Triton engine", stacklevel=3)
        return "per_step"
    if _backend.get_backend() == "triton":
        return "per_step"
    from ..kernels.launch import lstm_engine

    engine = lstm_engine(x_proj.device.type, x_proj.dtype, x_proj.shape[0], x_proj.shape[1], x_proj.shape[2] // 4,
                         w_hr is not None, persistent_ok=supported)
    if engine == "per_step" and not _backend.triton_available():
        _backend.warn_fallback(OP, "triton is not available for the per-step engine")
        return "reference"
    return engine


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: one cell step.


@torch.library.custom_op("dlkernels::lstm_cell_forward", mutates_args=())
def lstm_cell_forward(gx: Tensor, gh: Tensor, cx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, c, gates) of one step from the two gate pre-activations (B, 4H): h, c in gx's dtype, gates the
    post-activation gates in fp32 (fp64 for fp64), saved for backward."""
    unsupported = "float64 inputs (the kernels are fp16/bf16/fp32)" if gx.dtype == torch.float64 else None
    # The family has a CUDA C++ kernel (the persistent recurrence); one cell step runs the Triton cell under
    # backend "cuda" too.
    if gx.numel() and _backend.choose(OP, gx.device, has_cuda=True, unsupported=unsupported) != "reference":
        from ..kernels import lstm as kernels

        return kernels.cell_forward(gx.contiguous(), gh.contiguous(), cx.contiguous())
    return reference_cell(gx, gh, cx)


@lstm_cell_forward.register_fake
def _(gx, gh, cx):
    return cx.new_empty(cx.shape, dtype=gx.dtype), cx.new_empty(cx.shape, dtype=gx.dtype), \
        gx.new_empty(gx.shape, dtype=_acc_dtype(gx.dtype))


def reference_cell_backward(grad_h, grad_c, gates, cx):
    acc = gates.dtype
    i, f, g, o = gates.chunk(4, dim=-1)
    cx = cx.to(acc)
    tanh_c = torch.tanh(f * cx + i * g)
    dh, dc = grad_h.to(acc), grad_c.to(acc)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d_pre = torch.cat([dc * g * i * (1 - i), dc * cx * f * (1 - f), dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)],
                      dim=-1)
    return d_pre, dc * f


@torch.library.custom_op("dlkernels::lstm_cell_backward", mutates_args=())
def lstm_cell_backward(grad_h: Tensor, grad_c: Tensor, gates: Tensor, cx: Tensor, dtype: torch.dtype
                       ) -> tuple[Tensor, Tensor]:
    """(grad of the gate pre-activations (B, 4H) in ``dtype``, grad of cx in cx's dtype)."""
    unsupported = "float64 inputs (the kernels are fp16/bf16/fp32)" if gates.dtype == torch.float64 else None
    if gates.numel() and _backend.choose(OP, gates.device, has_cuda=True, unsupported=unsupported) != "reference":
        from ..kernels import lstm as kernels

        d_pre, dcx = kernels.cell_backward(grad_h.contiguous(), grad_c.contiguous(), gates.contiguous(),
                                           cx.contiguous(), dtype)
        return d_pre, dcx
    d_pre, dcx = reference_cell_backward(grad_h, grad_c, gates, cx)
    return d_pre.to(dtype), dcx.to(cx.dtype)


@lstm_cell_backward.register_fake
def _(grad_h, grad_c, gates, cx, dtype):
    return gates.new_empty(gates.shape, dtype=dtype), cx.new_empty(cx.shape)


def _cell_setup_context(ctx, inputs, output):
    gx, gh, cx = inputs
    ctx.save_for_backward(output[2], cx)
    ctx.dtype = gx.dtype
    ctx.mark_non_differentiable(output[2])


def _cell_backward(ctx, grad_h, grad_c, _grad_gates):
    gates, cx = ctx.saved_tensors
    if grad_h is None:
        grad_h = cx.new_zeros(cx.shape)
    if grad_c is None:
        grad_c = cx.new_zeros(cx.shape)
    d_pre, dcx = torch.ops.dlkernels.lstm_cell_backward(grad_h, grad_c, gates, cx, ctx.dtype)
    return d_pre, d_pre, dcx


lstm_cell_forward.register_autograd(_cell_backward, setup_context=_cell_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the recurrence of one layer-direction.


def _saved_shapes(x_proj: Tensor, c0: Tensor, training: bool):
    steps, batch, four_h = x_proj.shape
    acc = _acc_dtype(x_proj.dtype)
    if not training:
        return x_proj.new_empty(0, dtype=acc), x_proj.new_empty(0, dtype=acc)
    return x_proj.new_empty((steps, batch, four_h), dtype=acc), x_proj.new_empty((steps, batch, c0.shape[1]), dtype=acc)


@torch.library.custom_op("dlkernels::lstm_recurrence", mutates_args=())
def lstm_recurrence(
    x_proj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (T, B, P), h_n (B, P), c_n (B, H), gates, c_all) of one layer-direction.

    x_proj (T, B, 4H): the input projection of every step with both biases added; w_hh (4H, P); w_hr (P, H) or
    None (then P = H); h0 (B, P), c0 (B, H) in x_proj's dtype; lengths (B,) int64 or None. ``training``: also
    return what backward needs, gates (T, B, 4H) post-activation and c_all (T, B, H) (fp32; fp64 for fp64), in the
    order the steps ran (reversed time for ``reverse``); else both are empty.
    """
    if x_proj.shape[0] == 0 or x_proj.shape[1] == 0:
        gates, c_all = _saved_shapes(x_proj, c0, training)
        return x_proj.new_zeros((*x_proj.shape[:2], h0.shape[1])), h0.clone(), c0.clone(), gates, c_all
    engine = _engine(x_proj, w_hr)
    if engine == "reference":
        y, h_n, c_n, gates, c_all = reference_recurrence(x_proj, w_hh, w_hr, h0, c0, lengths, reverse)
        if not training:
            gates, c_all = _saved_shapes(x_proj, c0, False)
        return y, h_n, c_n, gates, c_all
    from ..kernels import lstm as kernels

    return kernels.recurrence_forward(engine, x_proj, w_hh, w_hr, h0, c0, lengths, reverse, training)


@lstm_recurrence.register_fake
def _(x_proj, w_hh, w_hr, h0, c0, lengths, reverse, training):
    steps, batch, _ = x_proj.shape
    gates, c_all = _saved_shapes(x_proj, c0, training)
    return x_proj.new_empty((steps, batch, h0.shape[1])), h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, c_all


@torch.library.custom_op("dlkernels::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward(
    grad_y: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    x_proj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    y: Tensor,
    gates: Tensor,
    c_all: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x_proj, grad w_hh, grad w_hr (empty without w_hr), grad h0, grad c0), each in its input's dtype."""
    if x_proj.shape[0] == 0 or x_proj.shape[1] == 0:
        return (torch.zeros_like(x_proj), torch.zeros_like(w_hh),
                torch.zeros_like(w_hr) if w_hr is not None else w_hh.new_empty(0), grad_h_n.to(h0.dtype).clone(),
                grad_c_n.to(c0.dtype).clone())
    if gates.numel() == 0:
        raise RuntimeError("dlkernels::lstm_recurrence_backward: the forward ran with training=False (nothing saved)")
    engine = _engine(x_proj, w_hr)
    if engine == "reference":
        return reference_recurrence_backward(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, lengths, reverse, y,
                                             gates, c_all)
    from ..kernels import lstm as kernels

    return kernels.recurrence_backward(engine, grad_y, grad_h_n, grad_c_n, x_proj, w_hh, w_hr, h0, c0, lengths,
                                       reverse, y, gates, c_all)


@lstm_recurrence_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, x_proj, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all):
    return (x_proj.new_empty(x_proj.shape), w_hh.new_empty(w_hh.shape),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape))


def reference_recurrence_backward(grad_y, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all):
    """Backward through time in eager PyTorch from the saved gates and cell states (fp32; fp64 for fp64)."""
    dtype, acc = y.dtype, gates.dtype
    steps = gates.shape[0]
    if reverse:
        grad_y, y = reverse_time(grad_y, lengths), reverse_time(y, lengths)
    whh = w_hh.to(acc)
    whr = w_hr.to(acc) if w_hr is not None else None
    dh, dc = grad_h_n.to(acc), grad_c_n.to(acc)
    c0 = c0.to(acc)
    d_pres, d_projected = [None] * steps, [None] * steps
    for t in range(steps - 1, -1, -1):
        active = (t < lengths).unsqueeze(1) if lengths is not None else torch.ones_like(dh[:, :1], dtype=torch.bool)
        dh_total = dh + torch.where(active, grad_y[t].to(acc), 0.0)
        dh_raw = dh_total @ whr if whr is not None else dh_total
        i, f, g, o = gates[t].chunk(4, dim=-1)
        c_prev = c_all[t - 1] if t > 0 else c0
        tanh_c = torch.tanh(c_all[t])
        dc_total = dc + dh_raw * o * (1 - tanh_c * tanh_c)
        d_pre = torch.cat([dc_total * g * i * (1 - i), dc_total * c_prev * f * (1 - f), dc_total * i * (1 - g * g),
                           dh_raw * tanh_c * o * (1 - o)], dim=-1)
        d_pre = torch.where(active, d_pre, 0.0)
        dc = torch.where(active, dc_total * f, dc)
        dh = torch.where(active, d_pre @ whh, dh_total)
        d_pres[t], d_projected[t] = d_pre, torch.where(active, dh_total, 0.0)
    grad_x = torch.stack(d_pres)
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).to(acc).flatten(0, 1)
    grad_w_hh = grad_x.flatten(0, 1).t() @ h_prev
    grad_w_hr = w_hh.new_empty(0)
    if whr is not None:
        o = gates[..., 3 * c0.shape[1]:]
        h_raw = (o * torch.tanh(c_all)).to(dtype).to(acc).flatten(0, 1)
        grad_w_hr = (torch.stack(d_projected).flatten(0, 1).t() @ h_raw).to(w_hr.dtype)
    if reverse:
        grad_x = reverse_time(grad_x, lengths)
    return grad_x.to(dtype), grad_w_hh.to(w_hh.dtype), grad_w_hr, dh.to(h0.dtype), dc.to(c0.dtype)


def _recurrence_setup_context(ctx, inputs, output):
    x_proj, w_hh, w_hr, h0, c0, lengths, reverse, training = inputs
    y, h_n, c_n, gates, c_all = output
    ctx.save_for_backward(x_proj, w_hh, w_hr, h0, c0, lengths, y, gates, c_all)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(gates, c_all)


def _recurrence_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_c_all):
    x_proj, w_hh, w_hr, h0, c0, lengths, y, gates, c_all = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    dx, dwhh, dwhr, dh0, dc0 = torch.ops.dlkernels.lstm_recurrence_backward(
        grad_y, grad_h_n, grad_c_n, x_proj, w_hh, w_hr, h0, c0, lengths, ctx.reverse, y, gates, c_all
    )
    return dx, dwhh, (dwhr if w_hr is not None else None), dh0, dc0, None, None, None


lstm_recurrence.register_autograd(_recurrence_backward, setup_context=_recurrence_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public functions.


def _check_tensor(name: str, t, like: Tensor, shape: tuple, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != like.dtype:
        raise RuntimeError(f"{fn}: {name} has dtype {t.dtype} but input has dtype {like.dtype}")
    if t.device != like.device:
        raise RuntimeError(f"{fn}: {name} is on {t.device} but input is on {like.device}")


def _check_input(fn: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise RuntimeError(f"{fn}: input dtype {input.dtype} is not supported (expected a floating dtype: "
                           "float16, bfloat16, float32 or float64)")


def _needs_saved(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step, ``torch.lstm_cell``'s semantics: input (B, I) or unbatched (I,), hx, cx (B, H) or (H,),
    w_ih (4H, I), w_hh (4H, H), b_ih, b_hh (4H,) or None. Returns (h, c) in the input's dtype."""
    fn = "lstm_cell"
    _check_input(fn, input)
    if input.dim() not in (1, 2):
        raise ValueError(f"{fn}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if not isinstance(w_ih, Tensor) or w_ih.dim() != 2 or w_ih.shape[0] % 4:
        raise RuntimeError(f"{fn}: w_ih must be a (4*hidden_size, input_size) matrix, got "
                           f"{tuple(w_ih.shape) if isinstance(w_ih, Tensor) else type(w_ih).__name__}")
    hidden = w_ih.shape[0] // 4
    batched = input.dim() == 2
    lead = (input.shape[0],) if batched else ()
    _check_tensor("w_ih", w_ih, input, (4 * hidden, input.shape[-1]), fn)
    _check_tensor("w_hh", w_hh, input, (4 * hidden, hidden), fn)
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(name, b, input, (4 * hidden,), fn)
    _check_tensor("hx", hx, input, (*lead, hidden), fn)
    _check_tensor("cx", cx, input, (*lead, hidden), fn)
    if not batched:
        input, hx, cx = input.unsqueeze(0), hx.unsqueeze(0), cx.unsqueeze(0)
    gx = torch.nn.functional.linear(input, w_ih, b_ih)
    gh = torch.nn.functional.linear(hx, w_hh, b_hh)
    h, c, _ = lstm_cell_forward(gx, gh, cx)
    return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


def _check_layer_args(fn, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, directions: int):
    _check_input(fn, input)
    if input.dim() != 3:
        raise ValueError(f"{fn}: input must be (T, B, input_size), got {input.dim()}D input")
    steps, batch, size = input.shape
    for d in range(directions):
        suffix = "" if directions == 1 else ("", "_reverse")[d]
        wi, wh = w_ih[d] if directions > 1 else w_ih, w_hh[d] if directions > 1 else w_hh
        if not isinstance(wh, Tensor) or wh.dim() != 2 or wh.shape[0] % 4:
            raise RuntimeError(f"{fn}: w_hh{suffix} must be a (4*hidden_size, hidden or proj size) matrix")
        hidden = wh.shape[0] // 4
        wr = (w_hr[d] if directions > 1 else w_hr) if w_hr is not None else None
        out = wr.shape[0] if wr is not None else hidden
        _check_tensor(f"w_ih{suffix}", wi, input, (4 * hidden, size), fn)
        _check_tensor(f"w_hh{suffix}", wh, input, (4 * hidden, out), fn)
        if wr is not None:
            _check_tensor(f"w_hr{suffix}", wr, input, (out, hidden), fn)
        for name, b in ((f"b_ih{suffix}", b_ih), (f"b_hh{suffix}", b_hh)):
            b = b[d] if (b is not None and directions > 1) else b
            if b is not None:
                _check_tensor(name, b, input, (4 * hidden,), fn)
        hd, cd = (h0[d], c0[d]) if directions > 1 else (h0, c0)
        _check_tensor(f"h0{suffix}", hd, input, (batch, out), fn)
        _check_tensor(f"c0{suffix}", cd, input, (batch, hidden), fn)
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"{fn}: lengths must be a 1-D tensor of {batch} sequence lengths")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{fn}: lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
            raise ValueError(f"{fn}: lengths must lie in [0, {steps}] (the input has {steps} steps), got "
                             f"min {int(lengths.min())} max {int(lengths.max())}")


def _lengths_on(lengths: Optional[Tensor], device) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int64)


def _recurrence(x_proj, w_hh, w_hr, h0, c0, lengths, reverse):
    training = _needs_saved(x_proj, w_hh, w_hr, h0, c0)
    y, h_n, c_n, _, _ = lstm_recurrence(x_proj, w_hh, w_hr, h0, c0, lengths, bool(reverse), training)
    return y, h_n, c_n


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over the whole sequence: input (T, B, I), h0 (B, P), c0 (B, H) with
    P = proj_size or H; torch's weight layouts. Returns (output (T, B, P), h_n (B, P), c_n (B, H)).

    The input projection of every step (both biases folded in) is one GEMM; then the recurrence op.
    See the module docstring for ``lengths`` and ``reverse``.
    """
    _check_layer_args("lstm_layer", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1)
    steps, batch, _ = input.shape
    x_proj = _project(input, [w_ih], [b_ih], [b_hh])[0]
    return _recurrence(x_proj, w_hh, w_hr, h0, c0, _lengths_on(lengths, input.device), reverse)


def _project(input: Tensor, w_ih: list, b_ih: list, b_hh: list) -> list[Tensor]:
    """The input projection of every step for each direction, as one (batched) GEMM: a list of (T, B, 4H)."""
    steps, batch, size = input.shape
    x = input.reshape(steps * batch, size)
    bias = None
    if b_ih[0] is not None or b_hh[0] is not None:
        bias = [sum(b for b in (bi, bh) if b is not None) for bi, bh in zip(b_ih, b_hh)]
    four_h = w_ih[0].shape[0]
    if len(w_ih) == 1:
        out = torch.nn.functional.linear(x, w_ih[0], bias[0] if bias is not None else None)
        return [out.view(steps, batch, four_h)]
    w = torch.stack(w_ih).transpose(1, 2)  # (D, I, 4H)
    xs = x.unsqueeze(0).expand(len(w_ih), -1, -1)
    out = torch.baddbmm(torch.stack(bias).unsqueeze(1), xs, w) if bias is not None else torch.bmm(xs, w)
    return [o.view(steps, batch, four_h) for o in out.unbind(0)]


def lstm_layer_bidirectional(
    input: Tensor,
    h0: tuple[Tensor, Tensor],
    c0: tuple[Tensor, Tensor],
    w_ih: tuple[Tensor, Tensor],
    w_hh: tuple[Tensor, Tensor],
    b_ih: Optional[tuple[Tensor, Tensor]] = None,
    b_hh: Optional[tuple[Tensor, Tensor]] = None,
    w_hr: Optional[tuple[Tensor, Tensor]] = None,
    *,
    lengths: Optional[Tensor] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Both directions of one layer (each argument a (forward, reverse) pair): the two input projections are one
    batched GEMM. Returns (output (T, B, 2P) = [forward, reverse], (h_n fwd, h_n rev), (c_n fwd, c_n rev))."""
    _check_layer_args("lstm_layer_bidirectional", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 2)
    b_ih = b_ih if b_ih is not None else (None, None)
    b_hh = b_hh if b_hh is not None else (None, None)
    x_proj = _project(input, list(w_ih), list(b_ih), list(b_hh))
    lengths = _lengths_on(lengths, input.device)
    results = [
        _recurrence(x_proj[d], w_hh[d], w_hr[d] if w_hr is not None else None, h0[d], c0[d], lengths, d == 1)
        for d in range(2)
    ]
    return (torch.cat([results[0][0], results[1][0]], dim=2), (results[0][1], results[1][1]),
            (results[0][2], results[1][2]))
