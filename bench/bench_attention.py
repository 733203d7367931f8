"""Attention benchmark: dense (vs every SDPA backend and FlexAttention) and truncated/sliding-window attention (vs
FlexAttention with a block mask, SDPA with a dense mask, ``torch.nn.attention.varlen`` with ``window_size``).

FLOPs count only the (query, key) pairs actually attended: 4 * D per pair forward (QK^T and PV), 10 * D backward
(five matmuls), 14 * D forward+backward. Inputs are bf16, (B, H, N, D) contiguous, rotated past the L2 cache.
FlexAttention's compile time and block-mask build time are reported apart, in the case notes (they are not timed).
"""
from __future__ import annotations

import inspect
import math
import time

import torch

import runner
import dlkernels
from dlkernels.ops import attention
from dlkernels.ops.attention import allowed_mask
from dlkernels.testing import compare, make_input

OP = "attention"
DTYPE = torch.bfloat16
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOPS_PER_PAIR = {"fwd": 4, "bwd": 10, "fwd+bwd": 14}


def attended_pairs(nq: int, nk: int, left: int | None, right: int | None) -> int:
    """Number of (i, j) with i - left <= j <= i + right, 0 <= j < nk, over 0 <= i < nq (None = unbounded)."""
    i = torch.arange(nq, dtype=torch.int64)
    lo = torch.zeros_like(i) if left is None else (i - left).clamp(min=0)
    hi = torch.full_like(i, nk - 1) if right is None else (i + right).clamp(max=nk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _inputs(b, h, n, d, count, requires_grad):
    sets = []
    for _ in range(count):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=DTYPE, requires_grad=requires_grad) for _ in range(3))
        sets.append((q, k, v, torch.randn(b, h, n, d, device="cuda", dtype=DTYPE)))
    return sets


def _timed(forward, input_sets, mode):
    """A no-argument callable running ``mode`` of ``forward(q, k, v)`` over rotating input sets."""
    if mode == "fwd":
        def run(q, k, v, do):
            with torch.no_grad():
                return forward(q, k, v)
        return runner.rotating(run, input_sets)
    if mode == "fwd+bwd":
        def run(q, k, v, do):
            return torch.autograd.grad(forward(q, k, v), (q, k, v), do)
        return runner.rotating(run, input_sets)
    # bwd: the forward graph is built once per input set and replayed.
    graphs = [(forward(q, k, v), q, k, v, do) for q, k, v, do in input_sets]

    def run(out, q, k, v, do):
        return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    return runner.rotating(run, graphs)


# Only the provider being timed holds GPU memory: building the next one's inputs frees the previous one's.
_live: dict = {}


def _lazy_provider(key, build):
    """A provider that builds its state (inputs, graphs, compiled functions) on first call, dropping any other."""
    def call():
        if _live.get("key") != key:
            _live.clear()
            torch.cuda.empty_cache()
            _live["fn"] = build()
            _live["key"] = key
        return _live["fn"]()
    return call


def _sdpa(backend_name, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def forward(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    return forward


def _flex(b, h, n, d, left, right, note):
    """FlexAttention compiled, with a block mask for the window; compile and mask-build times go to ``note``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        ok = q_idx >= 0  # every pair, narrowed by each bounded side
        if left is not None:
            ok = ok & (q_idx - kv_idx <= left)
        if right is not None:
            ok = ok & (kv_idx - q_idx <= right)
        return ok

    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda") if (left, right) != (None, None) else None
    torch.cuda.synchronize()
    mask_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention)

    def forward(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    # Compile forward and backward once, outside the timing.
    q, k, v, do = _inputs(b, h, n, d, 1, True)[0]
    start = time.perf_counter()
    torch.autograd.grad(forward(q, k, v), (q, k, v), do)
    torch.cuda.synchronize()
    note.append(f"compile {time.perf_counter() - start:.1f} s, block mask {mask_s * 1e3:.1f} ms (not timed)")
    return forward


def _ours(**kwargs):
    def forward(q, k, v):
        return attention(q, k, v, **kwargs)
    return forward


def _varlen(b, n, left, right):
    """torch.nn.attention.varlen on (B*N, H, D) packed sequences; None (with why) where this torch lacks windows."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, "torch.nn.attention.varlen not in this torch"
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None, "varlen_attn has no window_size in this torch"
    cu_seq = torch.arange(0, (b + 1) * n, n, device="cuda", dtype=torch.int32)
    window = (-1 if left is None else left, -1 if right is None else right)

    def pack(t):
        return t.transpose(1, 2).reshape(b * n, t.shape[1], t.shape[3])

    def forward(q, k, v):
        # (B, H, N, D) -> (B*N, H, D) and back: the layout varlen wants (the copies count in its time here).
        out = varlen_attn(pack(q), pack(k), pack(v), cu_seq, cu_seq, n, n, window_size=window)
        return out.view(b, n, q.shape[1], q.shape[3]).transpose(1, 2)
    return forward, "packed (B*N, H, D); layout copies included"


def _case(name, shape, window, forwards, mode, params):
    """``forwards``: provider -> (no-argument builder of forward(q, k, v), notes list). Everything is built lazily."""
    b, h, n, d = shape
    left, right = window
    count = runner.rotation_count(4 * b * h * n * d * 2)
    providers, notes = {}, {}
    for provider, (make_forward, note) in forwards.items():
        def build(make_forward=make_forward):
            return _timed(make_forward(), _inputs(b, h, n, d, count, requires_grad=mode != "fwd"), mode)
        providers[provider] = _lazy_provider((name, mode, provider), build)
        notes[provider] = note
    flops = FLOPS_PER_PAIR[mode] * b * h * d * attended_pairs(n, n, left, right)
    return runner.Case(OP, name, mode, providers, flops=flops, params=params, notes=_NoteView(notes))


class _NoteView(dict):
    """Case notes whose values are filled in while providers build (compile times): joined to text when read."""

    def __getitem__(self, key):
        return "; ".join(dict.__getitem__(self, key))

    def __contains__(self, key):
        return dict.__contains__(self, key) and bool(dict.__getitem__(self, key))


def dense_cases(quick: bool) -> list:
    cases = []
    lengths = [4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    dims = [128] if quick else [64, 128]
    modes = ["fwd", "fwd+bwd"] if quick else list(MODES)
    for d in dims:
        h = 2048 // d
        for n in lengths:
            b = max(1, 16384 // n)
            for causal in (False, True):
                right = 0 if causal else None
                name = f"dense B{b} H{h} N{n} D{d}{' causal' if causal else ''}"
                for mode in modes:
                    flex_note: list = []
                    forwards = {"dlkernels": (lambda causal=causal: _ours(causal=causal), [])}
                    for backend in SDPA_BACKENDS:
                        forwards[f"sdpa {backend.lower()}"] = (
                            lambda backend=backend, causal=causal: _sdpa(backend, is_causal=causal), []
                        )
                    forwards["flex attention"] = (
                        lambda b=b, h=h, n=n, d=d, right=right, note=flex_note: _flex(b, h, n, d, None, right, note),
                        flex_note,
                    )
                    params = dict(kind="dense", B=b, H=h, N=n, D=d, causal=causal, dtype="bf16")
                    cases.append(_case(name, (b, h, n, d), (None, right), forwards, mode, params))
    return cases


def window_cases(quick: bool) -> list:
    cases = []
    b, h, d = 2, 16, 64
    if quick:
        grid = [(16384, 256)]
    else:
        grid = [(n, w) for n in (4096, 16384, 65536) for w in (64, 256, 1024)]
        grid += [(n, 256) for n in (8192, 32768)]  # with the above: time against N at a fixed window of ±256
    modes = ["fwd", "fwd+bwd"] if quick else list(MODES)
    for n, w in grid:
        name = f"window ±{w} B{b} H{h} N{n} D{d}"
        for mode in modes:
            flex_note: list = []
            forwards = {
                "dlkernels": (lambda w=w: _ours(window=(w, w)), []),
                "flex attention (block mask)": (
                    lambda n=n, w=w, note=flex_note: _flex(b, h, n, d, w, w, note), flex_note
                ),
            }
            if n <= 16384:
                forwards["sdpa dense mask"] = (lambda n=n, w=w: _sdpa_dense_mask(n, w), ["default SDPA dispatch, bool mask"])
            varlen, varlen_note = _varlen(b, n, w, w)
            if varlen is not None:
                forwards["torch varlen"] = (lambda varlen=varlen: varlen, [varlen_note])
            params = dict(kind="window", B=b, H=h, N=n, D=d, window=w, dtype="bf16", sweep=w == 256)
            cases.append(_case(name, (b, h, n, d), (w, w), forwards, mode, params))
    return cases


def _sdpa_dense_mask(n, w):
    idx = torch.arange(n, device="cuda")
    mask = (idx[None, :] - idx[:, None]).abs() <= w

    def forward(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return forward


def cases(quick: bool) -> list:
    return dense_cases(quick) + window_cases(quick)


def _eager(q, k, v, allowed, scale):
    """Eager attention in q's dtype with an explicit mask (the error yardstick); rows with no key give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    return (torch.softmax(scores.masked_fill(~has_key, 0.0), -1) * allowed) @ v


def checks() -> list:
    """Triton forward and gradients vs float64, next to eager PyTorch in the same dtype (CPU: interpreter)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    configs = [
        # name, dtype, (b, hq, hkv, nq, nk, d), kwargs
        ("causal GQA d40", torch.float16, (1, 4, 2, 67, 93, 40), dict(causal=True)),
        ("window (7,3) + padding", torch.float16, (2, 2, 2, 50, 50, 64), dict(window=(7, 3), padding=True)),
        ("dense 113x203 d72", torch.float16, (1, 2, 1, 113, 203, 72), dict()),
    ]
    for name, dtype, (b, hq, hkv, nq, nk, d), kwargs in configs:
        q = make_input((b, hq, nq, d), dtype, device, seed=1, requires_grad=True)
        k = make_input((b, hkv, nk, d), dtype, device, seed=2, requires_grad=True)
        v = make_input((b, hkv, nk, d), dtype, device, seed=3, requires_grad=True)
        grad_out = make_input((b, hq, nq, d), dtype, device, seed=4)
        kpm = None
        if kwargs.pop("padding", False):
            kpm = torch.zeros(b, nk, dtype=torch.bool, device=device)
            kpm[-1, nk // 2:] = True
        window = kwargs.get("window")
        left, right = window if window else (-1, -1)
        if kwargs.get("causal"):
            right = 0
        scale = 1.0 / math.sqrt(d)
        with dlkernels.backend("triton"):
            out = attention(q, k, v, key_padding_mask=kpm, **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        allowed = allowed_mask(nq, nk, left, right, kpm, device)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        eager_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ref = _eager(*ref_leaves, allowed, scale)
        eager = _eager(*eager_leaves, allowed, scale)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
        eager_grads = torch.autograd.grad(eager, eager_leaves, grad_out)
        results.append(compare(f"attention {name} out", out, ref, eager))
        for g_name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
            results.append(compare(f"attention {name} {g_name}", g, rg, eg, factor=3.0))
    return results


def launch_workload() -> None:
    """The benchmark's Triton launches on CPU tensors, forward and backward, for bench/resource_usage.py (launches are
    recorded, not run): dense B4 H16 N4096 D128 (bf16 and fp16, causal or not) and the window ±256 B2 H16 N16384 D64
    bf16."""
    configs = [((4, 16, 4096, 128), dtype, dict(causal=causal))
               for dtype in (torch.bfloat16, torch.float16) for causal in (False, True)]
    configs.append(((2, 16, 16384, 64), torch.bfloat16, dict(window=(256, 256))))
    for shape, dtype, kwargs in configs:
        q, k, v = (torch.empty(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        b, h, n, d = shape
        what = "causal" if kwargs.get("causal") else "window ±256" if "window" in kwargs else "dense"
        name = f"{what} B{b} H{h} N{n} D{d} {str(dtype).replace('torch.', '')} fwd+bwd"
        with dlkernels.backend("triton"), runner.workload_case(name):
            out = attention(q, k, v, **kwargs)
            torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
