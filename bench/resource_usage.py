"""Registers and spills of every Triton launch, per ptxas, without a GPU.

Records the launches of tests/test_gpu_compile.py's workload (GPU block sizes, under the interpreter), compiles each
for sm_90 and prints cuobjdump's resource usage: ``STACK`` above 0 means registers spilled to local memory.

    python bench/resource_usage.py [module-substring ...]     # e.g. attention
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def record() -> list:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DLKERNELS_GPU_LAUNCH_CONFIG"] = "1"
    sys.path.insert(0, str(TESTS))
    import test_gpu_compile
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        desc = test_gpu_compile._describe(self.fn, args, kwargs)
        launches[json.dumps(desc, sort_keys=True)] = desc
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    test_gpu_compile._workload()
    return list(launches.values())


def usage(desc: dict) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(desc["module"]), desc["name"])
    constexprs = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in desc["constexprs"].items()}
    kernel = triton.compile(ASTSource(fn, desc["signature"], constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=desc["options"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    return next(line for line in out.splitlines() if "REG:" in line).split(" SHARED")[0].strip()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:  # child process: no interpreter
        for desc in json.load(sys.stdin):
            sizes = {k: v for k, v in desc["constexprs"].items() if k.startswith("BLOCK") or k == "D"}
            dtype = next((t for t in desc["signature"].values() if t.startswith("*")), "")
            print(f"{desc['name']:28s} {dtype:6s} {sizes} {desc['options']}: {usage(desc)}", flush=True)
        sys.exit(0)
    wanted = sys.argv[1:]
    launches = [d for d in record() if not wanted or any(w in d["module"] for w in wanted)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DLKERNELS_GPU_LAUNCH_CONFIG")}
    subprocess.run([sys.executable, __file__, "--compile"], input=json.dumps(launches), text=True, env=env, check=True)
