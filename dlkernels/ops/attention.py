"""Scaled dot-product attention with sliding windows, GQA, key padding and dropout: custom ops, checks, reference.

The public entry point is :func:`attention` (its docstring is the full reference). Below it: input checks, the
eager reference implementation (test oracle and fallback), and the ``dlkernels::attention_forward`` /
``dlkernels::attention_backward`` custom ops (autograd, fake tensors, backend choice).
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
    scale: float | torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q @ k^T * scale + mask) @ v`` with windows, GQA, padding and dropout.

    Shapes: ``q`` (B, Hq, Nq, Dk), ``k`` (B, Hkv, Nk, Dk), ``v`` (B, Hkv, Nk, Dv); returns (B, Hq, Nq, Dv) in q's
    dtype. Query head h reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention; Hq must be a multiple
    of Hkv). Any strides are accepted (no copies are made); ``Dv`` may differ from ``Dk`` as in
    ``F.scaled_dot_product_attention``. Empty sizes (B, H, Nq, Nk or a head dim 0) give empty or zero results as
    torch does (Nk = 0: every row attends nothing and returns zeros).

    Mask (absolute positions, top-left aligned like ``F.scaled_dot_product_attention(is_causal=True)``): query i may
    attend key j iff ``i - left <= j <= i + right`` with ``window=(left, right)`` (inclusive; ``None`` on a side =
    unbounded; bounded sides are ints >= 0) and ``key_padding_mask[b, j]`` is False (bool (B, Nk), True = padding,
    as in ``nn.MultiheadAttention``). ``causal=True`` is ``window=(None, 0)`` and composes with a window:
    ``causal=True, window=(left, right)`` means ``(left, min(right, 0))``. A query with no key left to attend
    returns zeros and zero gradients, never NaN (torch's math path returns NaN there).

    ``scale`` (a float or a 0-d tensor) defaults to ``1 / sqrt(Dk)``. ``dropout_p`` zeroes probabilities with that
    probability and scales the kept ones by ``1 / (1 - dropout_p)``; the mask comes from a 62-bit seed drawn from
    torch's default CPU generator on each call (``torch.manual_seed`` makes calls reproducible) and Philox counters
    indexed by (batch, head, query, key); the backward regenerates it. The reference path draws its mask with torch
    from the same seed, so the two backends drop different elements (each is correct dropout).

    NaN and Inf propagate as in torch for attended pairs: a non-finite query, or a non-finite key or value that a
    query attends, makes that query's output NaN (a row whose attended scores are all ``-inf`` is NaN, as torch's
    softmax gives). Keys and values a query cannot attend never reach it when they lie in a key block the kernel
    skips (as with torch's flash backend); inside a block it reads, a non-finite value times probability 0 is NaN
    (as with torch's math backend).

    ``deterministic`` is accepted for callers that set it; the backward has no atomics, so every call is bitwise
    reproducible whatever its value.

    Implementations: the Triton kernel (flash-attention style, Hopper-shaped: see ``dlkernels.kernels.attention``)
    for fp16 and bf16 with head dims up to 256, and the eager reference, which fp32 and fp64 inputs take on every
    device (their accuracy is eager PyTorch's) as do larger head dims (with a one-time warning). Under Triton's
    interpreter (CPU tests) bf16 operands are copied to fp32 first (the interpreter cannot do bf16 arithmetic).

    Differences from ``F.scaled_dot_product_attention``: 4-D inputs only; no arbitrary ``attn_mask`` (windows,
    causal and key padding instead); ``is_causal`` is spelled ``causal``; rows with no key give 0, not NaN; GQA
    needs no ``enable_gqa`` flag.

    The forward custom op also returns ``lse`` (B, Hq, Nq) float32, the natural-log log-sum-exp of each row's
    scaled scores (``+inf`` for rows with no key, so ``exp(s - lse)`` is 0 there); the backward uses only ``out``
    and ``lse``.
    """
    _check_inputs(q, k, v, key_padding_mask)
    left, right = _window_sides(causal, window)
    scale = _check_scale(scale, q.shape[-1])
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, (bool, numbers.Integral)) or flag not in (0, 1):
            raise TypeError(f"attention: {name} must be a bool, got {flag!r}")
    seed = _draw_seed() if dropout_p > 0 else None
    out, _ = torch.ops.dlkernels.attention_forward(
        q, k, v, key_padding_mask, seed, scale, left, right, float(dropout_p), bool(deterministic)
    )
    return out


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0  # Dk = 0: every score is 0 whatever the scale
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dim() != 0 or scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(f"attention: scale must be a float or a 0-d real tensor, got a tensor of shape "
                             f"{tuple(scale.shape)} and dtype {scale.dtype}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite float, got {scale!r}")
    return float(scale)


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
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k and v must agree in (B, H, N), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"attention: k batch {k.shape[0]} != q batch {b}")
    if k.shape[3] != d:
        raise ValueError(f"attention: k head dim {k.shape[3]} != q head dim {d}")
    hkv = k.shape[1]
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        raise ValueError(f"attention: q heads ({hq}) must be a multiple of k/v heads ({hkv})")
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
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
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
    b, hkv, nk, _ = k.shape
    group = q.shape[1] // hkv if hkv else 1
    dk = dk.reshape(b, hkv, group, nk, k.shape[3]).sum(2)
    dv = dv.reshape(b, hkv, group, nk, v.shape[3]).sum(2)
    return tuple(grad.to(t.dtype).contiguous() for grad, t in zip((dq, dk, dv), (q, k, v)))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Some size is 0: the reference computes the (empty or zero) result; there is nothing for a kernel to do."""
    return q.numel() == 0 or k.numel() == 0 or v.numel() == 0


def _unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    if max(q.shape[-1], v.shape[-1]) > _MAX_KERNEL_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {_MAX_KERNEL_HEAD_DIM}"
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
    if _empty(q, k, v):
        return attention_reference(q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p)
    impl = _backend.choose(OP, q.device, unsupported=_unsupported(q, v))
    if impl == "triton":
        from ..kernels import attention as kernels

        return kernels.forward(q, k, v, key_padding_mask, _seed_int(seed), scale, window_left, window_right, dropout_p)
    return attention_reference(q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, seed, scale, window_left, window_right, dropout_p, deterministic):
    b, hq, nq, _ = q.shape
    return q.new_empty((b, hq, nq, v.shape[3])), q.new_empty((b, hq, nq), dtype=torch.float32)


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
    if _empty(q, k, v):
        return _reference_backward(grad_out, q, k, v, key_padding_mask, seed, scale, window_left, window_right,
                                   dropout_p)
    impl = _backend.choose(OP, q.device, unsupported=_unsupported(q, v))
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
