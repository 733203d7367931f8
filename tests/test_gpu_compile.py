"""Compiles every Triton kernel launch of a representative workload for the GPU (sm_90), on a machine
without one: the interpreter accepts code that the GPU compiler rejects (shapes, dtypes, dot sizes), so this catches
it before a GPU is lent.

The workload runs under the interpreter with launches recorded (kernel, argument types, constexprs, warps, stages)
and with the GPU launch heuristics (``DLKERNELS_GPU_LAUNCH_CONFIG=1``); a subprocess without the interpreter then
compiles each distinct launch ahead of time with ``triton.compile`` for a CUDA target, ptxas included.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import dlkernels
from dlkernels.testing import make_input

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="on a GPU the real launches compile these kernels",
)

_TORCH_TO_TRITON = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1",
}


def _is_constexpr(annotation) -> bool:
    return "constexpr" in str(annotation)


def _describe(fn, args, kwargs) -> dict:
    """A JSON-able launch description: argument types, constexpr values and compile options."""
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs = {}, {}
    for p in params:
        value = bound.get(p.name, p.default)
        if _is_constexpr(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = {"dtype": str(value)} if type(value).__name__ == "dtype" else value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        elif value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot describe argument {p.name}={value!r}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def _workload():
    """Small calls of every op through the Triton backend, in every dtype the kernels take on a GPU.

    The values are not checked here (bf16 arithmetic is wrong under the interpreter); only the launches matter.
    """
    with dlkernels.backend("triton"):
        nchw, nhwc = (torch.contiguous_format, (4, 3, 5, 6)), (torch.channels_last, (4, 3, 5, 6))
        for dtype, (fmt, shape), relu in (
            (torch.float32, nchw, None), (torch.float32, nhwc, "relu"), (torch.float32, (torch.contiguous_format, (6, 5)), None),
            (torch.float16, nhwc, None), (torch.bfloat16, nchw, "relu"), (torch.bfloat16, nhwc, None),
        ):
            x = make_input(shape, dtype, memory_format=fmt, requires_grad=True)
            bn = dlkernels.nn.BatchNorm2d(shape[1], activation=relu) if len(shape) == 4 else \
                dlkernels.nn.BatchNorm1d(shape[1], activation=relu)
            bn(x).sum().backward()
            bn.eval()(x).sum().backward()
        for dtype in (torch.float16, torch.bfloat16):
            for head_dim, causal, window, dropout in ((64, False, None, 0.0), (40, True, (8, None), 0.0),
                                                      (128, False, (16, 16), 0.1)):
                q, k, v = (make_input((2, 2, 33, head_dim), dtype, seed=i, requires_grad=True) for i in range(3))
                padding = torch.arange(33) >= torch.tensor([[30], [33]])
                for deterministic, key_padding_mask in ((False, None), (True, padding)):
                    out = dlkernels.ops.attention(q, k, v, causal=causal, window=window, dropout_p=dropout,
                                                  deterministic=deterministic, key_padding_mask=key_padding_mask)
                    out.sum().backward()
        # conv2d: flattened-K (C_in=3) and tap-by-tap (C_in=32) reductions, every epilogue, a strided dgrad.
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for c_in, kernel, stride, padding, relu, pool in ((3, 3, 1, 1, "relu", ("max", 2)),
                                                              (32, 3, 1, 1, "relu", ("max", 2)),
                                                              (32, 3, 2, 1, "relu", ("avg", 2)),
                                                              (3, 7, 2, 3, None, None), (32, 1, 1, 0, "relu", None)):
                x = make_input((2, c_in, 12, 12), dtype, memory_format=torch.channels_last, requires_grad=True)
                w = make_input((32, c_in, kernel, kernel), dtype, seed=1, requires_grad=True)
                b = make_input(32, dtype, seed=2, requires_grad=True)
                dlkernels.ops.conv2d(x, w, b, stride, padding, activation=relu, pool=pool).sum().backward()
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.nn.Parameter(make_input((37,), dtype, seed=i)) for i in range(2)]
            for p in params:
                p.grad = make_input(p.shape, dtype, seed=9)
            for opt in (dlkernels.optim.Adam(params, amsgrad=True), dlkernels.optim.AdamW(params),
                        dlkernels.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
                        dlkernels.optim.SWATS(params)):
                opt.step()
                opt.step()


def test_every_triton_launch_compiles_for_the_gpu(tmp_path, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        desc = _describe(self.fn, args, kwargs)
        launches[json.dumps(desc, sort_keys=True)] = desc
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setenv("DLKERNELS_GPU_LAUNCH_CONFIG", "1")
    _workload()
    modules = {d["module"] for d in launches.values()}
    assert {"dlkernels.kernels.batch_norm", "dlkernels.kernels.attention", "dlkernels.kernels.optim",
            "dlkernels.kernels.conv"} <= modules

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(launches.values())))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DLKERNELS_GPU_LAUNCH_CONFIG")}
    proc = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True, env=env,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


def _compile_one(desc: dict) -> str | None:
    """Compiles one described launch for sm_90; returns the error, or None."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(desc["module"]), desc["name"])
    constexprs = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in desc["constexprs"].items()}
    try:
        src = ASTSource(fn, desc["signature"], constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=desc["options"])
    except Exception as exc:  # every failing launch is reported, not only the first
        return f"FAILED {desc['name']} {desc['constexprs']} {desc['signature']}:\n{type(exc).__name__}: {exc}\n"
    return None


def _compile_all(path: str) -> int:
    """Subprocess side: compiles every described launch on all cores; prints failures, returns their count."""
    from concurrent.futures import ProcessPoolExecutor

    launches = json.load(open(path))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        failures = [err for err in pool.map(_compile_one, launches) if err]
    print("".join(failures) + f"{len(launches)} launches, {len(failures)} failed compiles for sm_90")
    return len(failures)


if __name__ == "__main__":
    sys.exit(1 if _compile_all(sys.argv[1]) else 0)
