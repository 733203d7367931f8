"""Scaled dot-product attention with sliding windows, GQA, key padding and dropout: custom op, checks, reference.

``attention(q, k, v, *, causal=False, window=None, scale=None, key_padding_mask=None, dropout_p=0.0,
deterministic=False)`` computes ``softmax(q @ k^T * scale + mask) @ v`` per (batch, query head), where query head h
reads key/value head ``h // (Hq // Hkv)``.

Mask definition (absolute positions, top-left aligned like ``F.scaled_dot_product_attention(is_causal=True)``):
query i may attend key j iff ``i - left <= j <= i + right`` with ``window=(left, right)`` (inclusive; ``None`` on a
side = unbounded; bounded sides are ints >= 0), and ``key_padding_mask[b, j]`` is False (True = padding). ``causal=True`` is ``window=(None, 0)``
and composes with a left window: ``causal=True, window=(left, _)`` gives ``(left, min(right, 0))``. A query with no
key left returns zeros (and zero gradients), never NaN.

Dropout (``dropout_p > 0``) zeroes probabilities with probability ``dropout_p`` and scales the kept ones by
``1 / (1 - dropout_p)``. The mask comes from a 62-bit seed drawn from torch's default CPU generator on each call
(so ``torch.manual_seed`` makes calls reproducible) and Philox counters indexed by (batch, head, query, key); the
backward regenerates the same mask. The reference path draws its mask with torch from the same seed, so it differs
from the Triton kernel's mask (both are correct dropout; each is consistent between its forward and backward).

Implementations: the Triton kernel (flash-attention-2 style) for fp16 and bf16, and the eager reference, which
fp32 and fp64 inputs take on every device (no tf32 kernel: their accuracy is eager PyTorch's), as do head dims above
256. Under Triton's interpreter (CPU tests) bf16 operands are copied to fp32 first (the interpreter cannot do bf16
arithmetic) and the kernel runs with full-precision dots.

The forward op returns ``(out, lse)``: ``lse`` (B, Hq, Nq) float32 is the natural-log log-sum-exp of each row's
scaled scores, ``+inf`` for rows with no key (so ``exp(s - lse)`` is 0 there). The backward op uses only
``out`` and ``lse``. The kernel's backward has no atomics (dQ and dK/dV in separate passes), so every call is
bitwise reproducible and ``deterministic=True`` costs nothing; the flag is kept for callers that set it.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _backend

OP = "attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_KERNEL_HEAD_DIM = 256
_UNBOUNDED = -1  # window side encoding inside the custom ops


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """Attention of q (B, Hq, Nq, D) over k, v (B, Hkv, Nk, D); returns (B, Hq, Nq, D) in q's dtype.

    See the module docstring for the window / causal / padding / dropout definitions. ``scale`` defaults to
    ``1 / sqrt(D)``. Inputs may be strided (no copies are made); Hq must be a multiple of Hkv.
    """
    _check_inputs(q, k, v, key_padding_mask)
    left, right = _window_sides(causal, window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite float, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = torch.ops.dlkernels.attention_forward(
        q, k, v, key_padding_mask, seed, float(scale), left, right, float(dropout_p), bool(deterministic)
    )
    return out


def _check_inputs(q, k, v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise RuntimeError(f"attention: q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"attention: k batch {k.shape[0]} != q batch {b}")
    if k.shape[3] != d:
        raise ValueError(f"attention: k/v head dim {k.shape[3]} != q head dim {d}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"attention: q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if nq == 0 or k.shape[2] == 0 or d == 0:
        raise ValueError(f"attention: sequence lengths and head dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"attention: key_padding_mask must be a tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = ignore), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"attention: key_padding_mask must have shape (B, Nk) = {(b, k.shape[2])}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise RuntimeError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _window_sides(causal: bool, window) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side, causal folded in."""
    left = right = None
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"attention: window must be a (left, right) pair, got {window!r}")
        sides = []
        for side, value in zip(("left", "right"), window):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                    raise ValueError(f"attention: window {side} must be None or an int >= 0, got {value!r}")
                value = int(value)  # numpy and torch integers too
            sides.append(value)
        left, right = sides
    if causal:
        right = 0 if right is None else min(right, 0)
    return (_UNBOUNDED if left is None else left), (_UNBOUNDED if right is None else right)


def _draw_seed() -> torch.Tensor:
    return torch.randint(0, 2**62, (), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# Reference implementation (eager PyTorch): the test oracle and the CPU fallback.


def allowed_mask(nq: int, nk: int, left: int, right: int, key_padding_mask=None, device="cpu") -> torch.Tensor:
    """Bool (B or 1, 1, Nq, Nk): True where query i may attend key j (left/right: -1 = unbounded)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left != _UNBOUNDED:
        allowed &= j >= i - left
    if right != _UNBOUNDED:
        allowed &= j <= i + right
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def _reference_keep(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _reference_probs(q, k, v, key_padding_mask, seed, scale, left, right, dropout_p):
    """Compute-dtype (probs, dropout multiplier or None, k and v repeated per query head, scores)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)
    scores = (q.to(compute) @ kc.transpose(-1, -2)) * scale
    allowed = allowed_mask(q.shape[2], k.shape[2], left, right, key_padding_mask, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows with no key: softmax of zeros, then zeroed, so neither values nor gradients become NaN.
    empty = ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    multiplier = None
    if dropout_p > 0:
        multiplier = _reference_keep(seed, probs.shape, dropout_p, q.device) / (1.0 - dropout_p)
    return probs, multiplier, kc, vc, scores


def attention_reference(q, k, v, key_padding_mask, seed, scale, left, right, dropout_p):
    """Eager (out, lse) computed in float32 (float64 for float64 inputs); out in q's dtype."""
    probs, multiplier, _, vc, scores = _reference_probs(q, k, v, key_padding_mask, seed, scale, left, right, dropout_p)
    if multiplier is not None:
        probs = probs * multiplier
    out = (probs @ vc).to(q.dtype)
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    return out.contiguous(), lse.float().contiguous()


def _reference_backward(grad_out, q, k, v, key_padding_mask, seed, scale, left, right, dropout_p):
    """Explicit softmax backward (the custom op runs below autograd, so no autograd replay here)."""
    probs, multiplier, kc, vc, _ = _reference_probs(q, k, v, key_padding_mask, seed, scale, left, right, dropout_p)
    g = grad_out.to(probs.dtype)
    dropped = probs if multiplier is None else probs * multiplier
    dv = dropped.transpose(-1, -2) @ g
    dprobs = g @ vc.transpose(-1, -2)
    if multiplier is not None:
        dprobs = dprobs * multiplier
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
    dq = (dscores @ kc) * scale
    dk = (dscores.transpose(-1, -2) @ q.to(probs.dtype)) * scale
    b, hkv, nk, d = k.shape
    dk = dk.reshape(b, hkv, -1, nk, d).sum(2)
    dv = dv.reshape(b, hkv, -1, nk, d).sum(2)
    return tuple(grad.to(t.dtype).contiguous() for grad, t in zip((dq, dk, dv), (q, k, v)))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


def _unsupported(q: torch.Tensor) -> str | None:
    if q.shape[-1] > _MAX_KERNEL_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_MAX_KERNEL_HEAD_DIM}"
    if q.dtype not in _KERNEL_DTYPES:
        return f"{q.dtype} inputs (the kernel is fp16/bf16; fp32 and fp64 run the reference on every device)"
    return None


@torch.library.custom_op("dlkernels::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, q.device, unsupported=_unsupported(q))
    if impl == "triton":
        from ..kernels import attention as kernels

        return kernels.forward(q, k, v, key_padding_mask, _seed_int(seed), scale, window_left, window_right, dropout_p)
    return attention_reference(q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p, deterministic):
    b, hq, nq, d = q.shape
    return q.new_empty((b, hq, nq, d)), q.new_empty((b, hq, nq), dtype=torch.float32)


@torch.library.custom_op("dlkernels::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, q.device, unsupported=_unsupported(q))
    if impl == "triton":
        from ..kernels import attention as kernels

        return kernels.backward(
            grad_out, q, k, v, out, lse, key_padding_mask, _seed_int(seed), scale, window_left, window_right,
            dropout_p,
        )
    return _reference_backward(grad_out, q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, seed, scale, window_left, window_right, dropout_p, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, scale, left, right, dropout_p, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.options = (scale, left, right, dropout_p, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.dlkernels.attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
