"""Batch norm (+ fused ReLU) against nn.BatchNorm2d (cuDNN), nn.BatchNorm2d with cuDNN off, and torch.compile.

Bytes counted per element of x: train fwd 3 (read x for the statistics, read x again, write y), eval 2, fwd+bwd 8
(fwd 3, then read x and grad twice and write grad_input). ``python bench/bench_batch_norm.py`` runs it alone.
"""
import itertools

import torch

import dlkernels
import runner
from dlkernels.testing import compare, make_input

OP = "batch_norm"

QUICK = [
    ((32, 256, 56, 56), torch.float32, "nchw"),
    ((32, 256, 56, 56), torch.bfloat16, "nhwc"),
    ((128, 64, 112, 112), torch.bfloat16, "nchw"),
    ((128, 64, 112, 112), torch.bfloat16, "nhwc"),
]
SHAPES = [(32, 256, 56, 56), (128, 64, 112, 112), (256, 2048, 7, 7), (64, 6, 28, 28)]
BYTES_PER_ELEMENT = {"fwd": 3, "eval": 2, "fwd+bwd": 8}


def _models(c: int, dtype, relu: bool, compile_too: bool) -> dict:
    ours = dlkernels.nn.BatchNorm2d(c, activation="relu" if relu else None)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(c), *([torch.nn.ReLU()] if relu else []))
    models = {"dlkernels": ours, "torch (cuDNN)": theirs, "torch (no cuDNN)": theirs}
    if compile_too:
        models["torch.compile"] = torch.compile(theirs)
    return {k: m.cuda() for k, m in models.items()}


def _case(shape, dtype, layout, mode, relu, compile_too) -> runner.Case:
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    numel = torch.Size(shape).numel()
    nbytes = numel * torch.finfo(dtype).bits // 8
    sets = [
        (make_input(shape, dtype, "cuda", seed=i, memory_format=fmt, requires_grad=mode == "fwd+bwd"),
         make_input(shape, dtype, "cuda", seed=100 + i, memory_format=fmt))
        for i in range(runner.rotation_count(2 * nbytes))
    ]
    providers = {}
    for name, model in _models(shape[1], dtype, relu, compile_too).items():
        model.train(mode != "eval")
        params = [p for p in model.parameters()]

        def run(x, g, model=model, params=params, cudnn=name != "torch (no cuDNN)"):
            with torch.backends.cudnn.flags(enabled=cudnn):
                if mode != "fwd+bwd":
                    with torch.no_grad():
                        return model(x)
                y = model(x)
                return torch.autograd.grad(y, [x, *params], g)

        providers[name] = runner.rotating(run, sets)
    name = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout}{' +relu' if relu else ''}"
    return runner.Case(
        OP, name, mode, providers, bytes=BYTES_PER_ELEMENT[mode] * nbytes,
        params=dict(shape=list(shape), dtype=str(dtype), layout=layout, relu=relu),
    )


def cases(quick: bool) -> list:
    if quick:
        grid = [(s, d, l, m, False) for (s, d, l), m in itertools.product(QUICK, ("fwd", "fwd+bwd", "eval"))]
        grid += [(s, d, l, m, True) for (s, d, l) in QUICK[2:3] for m in ("fwd", "fwd+bwd")]
    else:
        grid = list(itertools.product(
            SHAPES, (torch.float32, torch.bfloat16), ("nchw", "nhwc"), ("fwd", "fwd+bwd", "eval"), (False, True)
        ))
    return [_case(s, d, l, m, r, compile_too=not quick) for s, d, l, m, r in grid]


def checks() -> list:
    """Small-shape correctness of the Triton kernels against eager PyTorch, both measured against float64."""
    results = []
    for shape, dtype, layout, relu in [
        ((6, 5, 7, 3), torch.float32, "nchw", False), ((6, 5, 7, 3), torch.float16, "nhwc", True),
        ((6, 5, 7, 3), torch.bfloat16, "nchw", True), ((9, 7), torch.float32, "nchw", True),
    ]:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x = make_input(shape, dtype, memory_format=fmt, mean=3.0)
        g = make_input(shape, dtype, seed=1, memory_format=fmt)
        w, b = make_input(shape[1], seed=2, std=0.5, mean=1.0), make_input(shape[1], seed=3)
        outs = {}
        for name, xin, wb in (("ours", x, (w, b)), ("eager", x, (w, b)), ("ref", x.double(), (w.double(), b.double()))):
            xin = xin.clone().requires_grad_()
            wb = [t.clone().requires_grad_() for t in wb]
            if name == "ours":
                with dlkernels.backend("triton"):
                    y = dlkernels.ops.batch_norm(xin, None, None, *wb, training=True, activation="relu" if relu else None)
            else:
                y = torch.nn.functional.batch_norm(xin, None, None, *wb, training=True)
                y = torch.relu(y) if relu else y
            outs[name] = (y, *torch.autograd.grad(y, [xin, *wb], g.to(y.dtype)))
        terms = x.numel() // shape[1]
        label = f"batch_norm {'x'.join(map(str, shape))} {layout}{' +relu' if relu else ''}"
        for i, what in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
            results.append(compare(f"{label} {what}", outs["ours"][i], outs["ref"][i], outs["eager"][i], terms=terms))
    return results


def launch_workload() -> None:
    """The benchmark's Triton launches (QUICK shapes; train fwd+bwd, eval, fused ReLU) on CPU tensors, for
    bench/resource_usage.py, which records them without running them: ``torch.empty`` inputs cost nothing."""
    for (shape, dtype, layout), relu in [*((q, False) for q in QUICK), (QUICK[2], True)]:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        name = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout}{' +relu' if relu else ''}"
        bn = dlkernels.nn.BatchNorm2d(shape[1], activation="relu" if relu else None)
        x = torch.empty(shape, dtype=dtype).to(memory_format=fmt).requires_grad_()
        with dlkernels.backend("triton"):
            with runner.workload_case(f"{name} train fwd+bwd"):
                y = bn.train()(x)
                torch.autograd.grad(y, [x, *bn.parameters()], torch.empty_like(y))
            with runner.workload_case(f"{name} eval"), torch.no_grad():
                bn.eval()(x)


if __name__ == "__main__":
    import sys

    sys.exit(runner.main_for(sys.modules[__name__]))
