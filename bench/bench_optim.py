"""Optimizer steps: dlkernels Adam / SGD against torch.optim's fused, foreach and for-loop implementations.

Workloads: the anchor's 155M fp32 params in 80 tensors of mixed sizes (../shared/anchors/baseline.py), a
ResNet-50-like list (161 tensors, 25.6M params), a LeNet-5-like list (10 tensors, 62k params: launch-bound) and the
155M list in bf16. Bytes are the minimal traffic per param (Adam: read p, g, m, v and write p, m, v = 7 words, 28 B in
fp32; SGD with momentum: 5 words; plain SGD: 3). Host time per step (Python + launches, no sync) is in each row's note.
"""
from __future__ import annotations

import time

import torch

import runner

import dlkernels
from dlkernels.testing import Comparison, compare, make_input

OP = "optim"

ANCHOR_SIZES = [4096 * 4096] * 4 + [4096 * 1024] * 16 + [4096] * 40 + [1024 * 1024] * 20  # 80 tensors, 155.4M


def resnet50_sizes() -> list[int]:
    """Parameter sizes of ResNet-50: 53 convolutions, 53 batch norms (weight, bias) and the classifier: 161 tensors."""
    sizes = [64 * 3 * 7 * 7, 64, 64]
    in_ch = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            convs = [in_ch * planes, planes * planes * 9, planes * planes * 4]
            if block == 0:
                convs.append(in_ch * planes * 4)
            for conv, out_ch in zip(convs, (planes, planes, planes * 4, planes * 4)):
                sizes += [conv, out_ch, out_ch]
            in_ch = planes * 4
    return sizes + [1000 * 2048, 1000]


LENET5_SIZES = [6 * 25, 6, 16 * 6 * 25, 16, 120 * 400, 120, 84 * 120, 84, 10 * 84, 10]  # 61,706 params

ADAM_WORDS, SGD_MOMENTUM_WORDS, SGD_WORDS = 7, 5, 3


def _params(sizes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in sizes:
        p = torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        p.grad = torch.randn(s, device="cuda", dtype=dtype, generator=gen)
        params.append(p)
    return params


def _stepper(make_opt, sizes, dtype, backend=None):
    """A no-argument step over one of enough param sets (each with its own optimizer) to rotate past L2."""
    bytes_per_set = sum(sizes) * torch.finfo(dtype).bits // 8 * 4
    sets = []
    for i in range(runner.rotation_count(bytes_per_set)):
        opt = make_opt(_params(sizes, dtype, seed=i))
        sets.append((opt,))

    def step(opt):
        if backend is None:
            opt.step()
        else:
            with dlkernels.backend(backend):
                opt.step()

    for (opt,) in sets:  # state allocated, kernels compiled
        step(opt)
    torch.cuda.synchronize()
    return runner.rotating(step, sets)


def _host_ms(fn, calls: int = 30) -> float:
    """Host time per call (Python and launches; the GPU is not waited for between calls)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def _ours_backends() -> dict[str, str | None]:
    """dlkernels (auto: the CUDA extension when built) and, when the extension is there too, its Triton path."""
    backends = {runner.OURS: None}
    if dlkernels.available_backends()["cuda"]:
        backends["dlkernels triton"] = "triton"
    return backends


def _case(name, sizes, dtype, ours_cls, torch_cls, kwargs, words, fused_ok=True):
    providers = {}
    for provider, backend in _ours_backends().items():
        providers[provider] = _stepper(lambda ps: ours_cls(ps, **kwargs), sizes, dtype, backend)
    flavours = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
    for flavour, extra in flavours.items():
        if flavour == "fused" and not fused_ok:
            continue
        providers[f"torch {torch_cls.__name__} {flavour}"] = _stepper(
            lambda ps, extra=extra: torch_cls(ps, **kwargs, **extra), sizes, dtype
        )
    n = sum(sizes)
    notes = {p: f"host {_host_ms(fn):.3f} ms/step" for p, fn in providers.items()}
    return runner.Case(
        op=OP, name=name, mode="step", providers=providers, bytes=words * n * torch.finfo(dtype).bits // 8,
        params={"tensors": len(sizes), "params": n, "dtype": str(dtype).replace("torch.", "")}, notes=notes,
    )


def cases(quick: bool) -> list[runner.Case]:
    adam = (dlkernels.optim.Adam, torch.optim.Adam, dict(lr=1e-3), ADAM_WORDS)
    sgd_momentum = (dlkernels.optim.SGD, torch.optim.SGD, dict(lr=1e-3, momentum=0.9), SGD_MOMENTUM_WORDS)
    sgd = (dlkernels.optim.SGD, torch.optim.SGD, dict(lr=1e-3), SGD_WORDS)
    out = [
        _case("adam 155M fp32, 80 tensors", ANCHOR_SIZES, torch.float32, *adam),
        _case("sgd-momentum 155M fp32, 80 tensors", ANCHOR_SIZES, torch.float32, *sgd_momentum),
        _case("adam resnet50 25.6M fp32, 161 tensors", resnet50_sizes(), torch.float32, *adam),
        _case("adam lenet5 62k fp32, 10 tensors", LENET5_SIZES, torch.float32, *adam),
        _case("adam 155M bf16, 80 tensors", ANCHOR_SIZES, torch.bfloat16, *adam),
    ]
    if not quick:
        out += [
            _case("sgd 155M fp32, 80 tensors", ANCHOR_SIZES, torch.float32, *sgd),
            _case("adamw resnet50 25.6M fp32, 161 tensors", resnet50_sizes(), torch.float32, dlkernels.optim.AdamW,
                  torch.optim.AdamW, dict(lr=1e-3), ADAM_WORDS),
            _case("sgd-momentum lenet5 62k fp32, 10 tensors", LENET5_SIZES, torch.float32, *sgd_momentum),
        ]
    return out


def _check_run(name, ours_cls, torch_cls, kwargs, steps=5) -> list[Comparison]:
    """``steps`` steps of the Triton kernels vs torch's for-loop optimizer (fp32 eager, fp64 reference)."""
    runs = {}
    for label, cls, dtype in (("ours", ours_cls, torch.float32), ("eager", torch_cls, torch.float32),
                              ("reference", torch_cls, torch.float64)):
        params = [make_input(s, dtype, seed=i) for i, s in enumerate([(257,), (9, 13)])]
        opt = cls(params, **kwargs) if cls is ours_cls else cls(params, foreach=False, **kwargs)
        with dlkernels.backend("triton" if cls is ours_cls else "reference"):
            for k in range(steps):
                for i, p in enumerate(params):
                    p.grad = make_input(p.shape, torch.float64, seed=100 + 7 * k + i).to(dtype)
                opt.step()
        runs[label] = params
    return [compare(f"{name} param[{i}]", *ps) for i, ps in enumerate(zip(runs["ours"], runs["reference"],
                                                                             runs["eager"]))]


def checks() -> list[Comparison]:
    results = []
    results += _check_run("Adam amsgrad wd", dlkernels.optim.Adam, torch.optim.Adam,
                          dict(lr=1e-2, weight_decay=0.1, amsgrad=True))
    results += _check_run("AdamW", dlkernels.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2))
    results += _check_run("SGD nesterov", dlkernels.optim.SGD, torch.optim.SGD,
                          dict(lr=0.1, momentum=0.9, nesterov=True))
    # SWATS has no torch optimizer: its eager reference (the CPU fallback) is the baseline.
    results += _check_run("SWATS", dlkernels.optim.SWATS, _SwatsReference, dict(lr=1e-2, eps=1e-4))
    return results


class _SwatsReference(dlkernels.optim.SWATS):
    """dlkernels.optim.SWATS on its reference path (eager PyTorch), for the CPU check."""

    def __init__(self, params, foreach=None, **kwargs):
        super().__init__(params, **kwargs)


def launch_workload() -> None:
    """Two steps of each optimizer over the anchor's 155.4M params (80 tensors; fp32, and bf16 for Adam) on CPU
    tensors, for bench/resource_usage.py, which records the launches without running them. Params and grads are
    ``torch.empty`` (untouched pages); the optimizer state each one allocates (up to 1.2 GB) is freed before the
    next."""
    configs = [
        ("adam", dlkernels.optim.Adam, dict(lr=1e-3), torch.float32),
        ("adamw", dlkernels.optim.AdamW, dict(lr=1e-3), torch.float32),
        ("sgd-momentum", dlkernels.optim.SGD, dict(lr=1e-3, momentum=0.9), torch.float32),
        ("swats", dlkernels.optim.SWATS, dict(lr=1e-3), torch.float32),
        ("adam", dlkernels.optim.Adam, dict(lr=1e-3), torch.bfloat16),
    ]
    for name, cls, kwargs, dtype in configs:
        params = [torch.empty(s, dtype=dtype).requires_grad_() for s in ANCHOR_SIZES]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = cls(params, **kwargs)
        with dlkernels.backend("triton"), runner.workload_case(f"{name} 155M {str(dtype).replace('torch.', '')}"):
            opt.step()
            opt.step()
        del opt, params
