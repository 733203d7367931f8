"""conv2d + bias + ReLU + pool (one fused op) against eager PyTorch (cuDNN conv, ReLU, pool: three kernels),
``torch.compile`` of the same block, and the cuDNN conv alone (no ReLU, no pool: what any conv-then-pool must pay).

Cases: the conv that ends each VGG-16 block (B32, 224^2 network input: 64 ch at 224^2 ... 512 ch at 14^2, 3x3 pad 1,
ReLU, 2x2 max pool), AlexNet's conv1 (torchvision: 3->64, 11x11 stride 4 pad 2, ReLU, 3x3 stride 2 max pool, B32),
LeNet-5's conv1 (1->6, 5x5 on 32^2, ReLU, 2x2 max pool, B256) and ResNet's stem (3->64, 7x7 stride 2 pad 3, no
ReLU/pool: BN follows it, B32). bf16 channels_last (fp32 channels_last too with --full), fwd and fwd+bwd (grads of
input, weight and bias).

FLOPs: 2 * N * C_out * OH * OW * C_in * KH * KW per conv (useful work: recomputed windows not counted), x3 for
fwd+bwd. Bytes (unavoidable traffic): fwd reads x and w, writes the pooled output; fwd+bwd adds reading grad_out
(pooled), x and w again and writing grad_input and grad_weight (the saved 1-byte codes counted too).
``python bench/bench_conv.py`` runs it alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dlkernels
import runner
from dlkernels.testing import compare, make_input

OP = "conv"

# name: (batch, c_in, c_out, hw, kernel, stride, padding, relu, pool)
SHAPES = {
    "VGG block 1": (32, 64, 64, 224, 3, 1, 1, True, ("max", 2)),
    "VGG block 2": (32, 128, 128, 112, 3, 1, 1, True, ("max", 2)),
    "VGG block 3": (32, 256, 256, 56, 3, 1, 1, True, ("max", 2)),
    "VGG block 4": (32, 512, 512, 28, 3, 1, 1, True, ("max", 2)),
    "VGG block 5": (32, 512, 512, 14, 3, 1, 1, True, ("max", 2)),
    "AlexNet conv1": (32, 3, 64, 224, 11, 4, 2, True, ("max", 3, 2)),
    "LeNet-5 conv1": (256, 1, 6, 32, 5, 1, 0, True, ("max", 2)),
    "ResNet stem": (32, 3, 64, 224, 7, 2, 3, False, None),
}
# The quick set (bench/gpu_check.sh gives conv about a minute, most of it torch.compile's compiles): the two VGG
# blocks the targets name. --full runs every shape, bf16 and fp32.
QUICK = ["VGG block 1", "VGG block 3"]
MODES = ("fwd", "fwd+bwd")


def geometry(shape):
    """(conv output hw, pooled output hw) of a SHAPES entry."""
    n, c_in, c_out, hw, k, s, p, relu, pool = shape
    out = (hw + 2 * p - k) // s + 1
    if pool is None:
        return out, out
    pk, ps = pool[1], pool[2] if len(pool) > 2 else pool[1]
    return out, (out - pk) // ps + 1


def work(shape, dtype, mode) -> tuple[float, float]:
    """(FLOPs, unavoidable bytes) of one call (module docstring)."""
    n, c_in, c_out, hw, k, s, p, relu, pool = shape
    out, pooled = geometry(shape)
    size = torch.finfo(dtype).bits // 8
    flops = 2.0 * n * c_out * out * out * c_in * k * k
    x_bytes, w_bytes = n * c_in * hw * hw * size, c_out * c_in * k * k * size
    y_bytes = n * c_out * pooled * pooled * size
    code_bytes = n * c_out * pooled * pooled if pool is not None else 0
    fwd = x_bytes + w_bytes + y_bytes + code_bytes
    if mode == "fwd":
        return flops, fwd
    return 3 * flops, fwd + y_bytes + code_bytes + 2 * (x_bytes + w_bytes)


def eager_block(x, w, b, shape):
    _, _, _, _, _, s, p, relu, pool = shape
    y = F.conv2d(x, w, b, s, p)
    if relu:
        y = torch.relu(y)
    if pool is not None:
        y = (F.max_pool2d if pool[0] == "max" else F.avg_pool2d)(y, pool[1], pool[2] if len(pool) > 2 else None)
    return y


def ours(x, w, b, shape):
    _, _, _, _, _, s, p, relu, pool = shape
    return dlkernels.ops.conv2d(x, w, b, s, p, activation="relu" if relu else None, pool=pool)


def conv_alone(x, w, b, shape):
    return F.conv2d(x, w, b, shape[5], shape[6])


def _inputs(shape, dtype, requires_grad, count):
    n, c_in, c_out, hw, k = shape[:5]
    sets = []
    for i in range(count):
        x = make_input((n, c_in, hw, hw), dtype, "cuda", seed=i, memory_format=torch.channels_last,
                       requires_grad=requires_grad)
        w = make_input((c_out, c_in, k, k), dtype, "cuda", seed=100 + i, std=(c_in * k * k) ** -0.5,
                       requires_grad=requires_grad)
        b = make_input(c_out, dtype, "cuda", seed=200 + i, requires_grad=requires_grad)
        sets.append((x, w, b))
    return sets


def _provider(fn, sets, shape, mode):
    if mode == "fwd":
        def run(x, w, b):
            with torch.no_grad():
                return fn(x, w, b, shape)
        return runner.rotating(run, sets)
    grads = {}

    def run(x, w, b):
        y = fn(x, w, b, shape)
        if y.shape not in grads:
            grads[y.shape] = torch.randn_like(y)
        return torch.autograd.grad(y, (x, w, b), grads[y.shape])
    return runner.rotating(run, sets)


def _case(name, dtype, mode, compile_too) -> runner.Case:
    shape = SHAPES[name]
    flops, nbytes = work(shape, dtype, mode)
    x_bytes = shape[0] * shape[1] * shape[3] ** 2 * torch.finfo(dtype).bits // 8
    sets = _inputs(shape, dtype, mode == "fwd+bwd", runner.rotation_count(2 * x_bytes))
    providers = {
        runner.OURS: _provider(ours, sets, shape, mode),
        "eager (cuDNN conv + relu + pool)": _provider(eager_block, sets, shape, mode),
        "cuDNN conv alone": _provider(conv_alone, sets, shape, mode),
    }
    if compile_too:
        providers["torch.compile"] = _provider(torch.compile(eager_block), sets, shape, mode)
    label = f"{name} {str(dtype).replace('torch.', '')} nhwc"
    return runner.Case(OP, label, mode, providers, bytes=nbytes, flops=flops,
                       params=dict(shape=list(shape[:5]), dtype=str(dtype), layout="nhwc"))


def cases(quick: bool) -> list:
    names = QUICK if quick else list(SHAPES)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    # torch.compile costs a compile per shape and mode: in the quick run only where the targets name it (VGG).
    return [_case(n, d, m, compile_too=not quick or n.startswith("VGG")) for d in dtypes for n in names for m in MODES]


def checks() -> list:
    """Small-shape correctness of the Triton kernels against eager PyTorch, both measured against float64."""
    results = []
    small = {
        "VGG-like": (2, 16, 16, 10, 3, 1, 1, True, ("max", 2)),
        "AlexNet-like": (1, 3, 16, 39, 11, 4, 2, True, ("max", 3, 2)),
        "LeNet-like": (2, 1, 6, 32, 5, 1, 0, True, ("avg", 2)),
        "ResNet-stem-like": (2, 3, 16, 23, 7, 2, 3, False, None),
    }
    for label, shape in small.items():
        n, c_in, c_out, hw, k = shape[:5]
        dtype = torch.float16
        x = make_input((n, c_in, hw, hw), dtype, memory_format=torch.channels_last)
        w = make_input((c_out, c_in, k, k), dtype, seed=1, std=(c_in * k * k) ** -0.5)
        b = make_input(c_out, dtype, seed=2)
        outs = {}
        for who, cast in (("ours", dtype), ("eager", dtype), ("ref", torch.float64)):
            args = [t.to(cast).requires_grad_() for t in (x, w, b)]
            if who == "ours":
                with dlkernels.backend("triton"):
                    y = ours(*args, shape)
            else:
                y = eager_block(*args, shape)
            g = make_input(y.shape, dtype, seed=3).to(cast)
            outs[who] = (y, *torch.autograd.grad(y, args, g))
        conv_out = geometry(shape)[0]
        pixels = n * conv_out * conv_out  # products summed into each weight / bias gradient
        terms = (c_in * k * k, c_out * k * k, pixels, pixels)
        for i, what in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
            results.append(compare(f"conv {label} {what}", outs["ours"][i], outs["ref"][i], outs["eager"][i],
                                   terms=terms[i]))
    return results


def launch_workload() -> None:
    """The benchmark's Triton launches (every shape, bf16 and fp32, forward and backward) on CPU tensors, for
    bench/resource_usage.py, which records them without running them: ``torch.empty`` inputs cost nothing."""
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape in SHAPES.items():
            n, c_in, c_out, hw, k = shape[:5]
            x = torch.empty((n, c_in, hw, hw), dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
            w = torch.empty((c_out, c_in, k, k), dtype=dtype, requires_grad=True)
            b = torch.empty(c_out, dtype=dtype, requires_grad=True)
            with dlkernels.backend("triton"), runner.workload_case(f"{name} {str(dtype).replace('torch.', '')}"):
                y = ours(x, w, b, shape)
                torch.autograd.grad(y, (x, w, b), torch.empty_like(y))


if __name__ == "__main__":
    import sys

    sys.exit(runner.main_for(sys.modules[__name__]))
