"""What the compiler makes of every kernel for an H100/H200 (sm_90), without a GPU.

    python bench/resource_usage.py [op ...]          # e.g. attention; default: every bench module
    python bench/resource_usage.py --json PATH       # default bench/results/resource_usage-sm90.json (runner.RESULTS)
    python bench/resource_usage.py --no-cuda-cpp     # Triton launches only

Triton: each ``bench/bench_<op>.py`` defines ``launch_workload()``, which calls the op's public entry points with the
Triton backend at the benchmark shapes on CPU tensors. It runs under Triton's interpreter with every kernel launch
recorded and NOT executed (so big shapes cost only the allocations). Each launch is specialized exactly as the JIT
specializes it at a launch on the GPU — Triton's own binder (``create_function_from_signature``) and
``JITFunction._pack_args`` with the sm_90 backend: 16-byte aligned pointers and ints divisible by 16 get
``tt.divisibility``, ints equal to 1 become constants — and a subprocess without the interpreter compiles each
distinct specialization with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, with the launch's warps and stages.

CUDA C++: every ``csrc/**/*.cu`` is compiled to an sm_90 cubin with torch's extension flags.

Per kernel it reports registers, spilled bytes (ptxas' "bytes spill stores": the widths of the SASS local stores;
the stack frame too), shared memory, resident programs per SM (registers, shared memory, threads, 32 blocks), and
what the TTGIR/SASS say about speed: the MMA each ``tl.dot`` became (``warp_group_dot`` = wgmma/HGMMA, ``tt.dot``
with an ``nvidia_mma`` v2 layout = mma.sync/HMMA), GPU-scope fences (``MEMBAR.*.GPU``), global atomics and reductions
(``ATOMG``/``RED``), and global load/store vector widths. Per launch it adds the grid and the waves on 132 SMs.

``tests/test_gpu_compile.py`` uses the same ``record``/``compile_launches`` on a small workload.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CSRC = REPO / "csrc"
sys.path.insert(0, str(BENCH_DIR))
import runner  # noqa: E402  (bench modules' shared helper: where results go, workload case names)

DEFAULT_JSON = runner.RESULTS / "resource_usage-sm90.json"


# ---------------------------------------------------------------------------------------------------------------
# sm_90 (H100/H200) limits, as the CUDA occupancy calculator (cuda_occupancy.h) applies them
# ---------------------------------------------------------------------------------------------------------------
SM90 = dict(
    sms=132,  # H100 SXM / H200
    regs_per_sm=65536,
    regs_per_block=65536,
    reg_unit=256,  # registers are allocated per warp in units of 256
    sub_partitions=4,
    max_regs_per_thread=255,
    smem_per_sm=233472,  # 228 KiB
    smem_per_block=232448,  # 227 KiB opt-in maximum
    smem_reserved_per_block=1024,
    smem_unit=128,
    threads_per_sm=2048,
    blocks_per_sm=32,
)


def resident_per_sm(regs: int, smem: int, warps: int, limits: dict = SM90) -> dict:
    """Programs (CTAs) of one kernel resident per SM and which limit binds, per cuda_occupancy.h."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / limits["reg_unit"]) * limits["reg_unit"]
    warps_per_sub = (limits["regs_per_sm"] // limits["sub_partitions"]) // regs_per_warp
    by_regs = warps_per_sub * limits["sub_partitions"] // warps
    if regs > limits["max_regs_per_thread"] or regs_per_warp * warps > limits["regs_per_block"]:
        by_regs = 0
    smem_alloc = math.ceil((smem + limits["smem_reserved_per_block"]) / limits["smem_unit"]) * limits["smem_unit"]
    by_smem = 0 if smem > limits["smem_per_block"] else limits["smem_per_sm"] // smem_alloc
    by_threads = limits["threads_per_sm"] // (32 * warps)
    bounds = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads, "blocks": limits["blocks_per_sm"]}
    limit = min(bounds, key=bounds.get)
    return {"resident": bounds[limit], "limited_by": limit}


def waves(programs: int, resident: int, sms: int = SM90["sms"]) -> dict:
    """Waves of ``programs`` over ``sms`` SMs holding ``resident`` each; ``tail`` = fill of the last wave (1 = full)."""
    slots = max(resident, 1) * sms
    rest = programs % slots
    return {"programs": programs, "waves": round(programs / slots, 3),
            "tail": round(rest / slots, 3) if rest else 1.0}


# ---------------------------------------------------------------------------------------------------------------
# What the TTGIR and the SASS say
# ---------------------------------------------------------------------------------------------------------------
_GLOBAL_MEM = re.compile(r"\b(LDG|STG|LDGSTS)((?:\.[A-Z0-9_]+)*)")


def _width(modifiers: str) -> str:
    mods = modifiers.split(".")
    for bits in ("256", "128", "64"):
        if bits in mods:
            return bits
    for m in mods:
        if m in ("U8", "S8"):
            return "8"
        if m in ("U16", "S16"):
            return "16"
    return "32"


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s*(.*?);")
_BACKWARD_BRANCH = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+`?\(?(0x[0-9a-f]+)")


def sass_counts(sass: str) -> dict:
    """Counts in SASS that matter for speed: MMA instructions, GPU-scope fences, atomics (also those inside a loop:
    between a backward branch and its target), global access widths."""
    code = [(int(a, 16), text) for a, text in _INSTRUCTION.findall(sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in code
             if (m := _BACKWARD_BRANCH.search(text)) and int(m.group(1), 16) <= addr]
    ops = Counter()
    for addr, text in code:
        in_loop = any(lo <= addr <= hi for lo, hi in loops)
        if re.search(r"\bHGMMA\b", text):
            ops["HGMMA"] += 1
        elif re.search(r"\bHMMA\b", text):
            ops["HMMA"] += 1
        if re.search(r"\bMEMBAR\.[A-Z.]*GPU\b", text) or re.search(r"\bMEMBAR\.[A-Z.]*SYS\b", text):
            ops["MEMBAR.GPU"] += 1
            ops["MEMBAR.GPU in loop"] += in_loop
        if re.search(r"\b(ATOMG|ATOM|RED|REDG)\.", text):
            ops["atomics"] += 1
            ops["atomics in loop"] += in_loop
        for m in re.finditer(r"\b(STL|LDL)((?:\.[A-Z0-9_]+)*)", text):  # local memory: register spills here
            ops["spill store bytes" if m.group(1) == "STL" else "spill load bytes"] += int(_width(m.group(2))) // 8
        if re.search(r"\bUTMALDG\b", text):
            ops["TMA loads"] += 1
        for m in _GLOBAL_MEM.finditer(text):
            ops[f"{m.group(1)}.{_width(m.group(2))}"] += 1
    return {k: v for k, v in sorted(ops.items()) if v}


def ttgir_dots(ttgir: str) -> dict:
    """The MMA each dot became: ``wgmma`` (warp_group_dot), ``mma.sync`` (tt.dot on an nvidia_mma v2 layout) or
    ``fma`` (tt.dot on a blocked layout: no tensor cores)."""
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<\{[^\n]*)", ttgir, flags=re.M))
    dots = Counter()
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line and "ttng.warp_group_dot_wait" not in line:
            dots["wgmma"] += 1
        elif re.search(r"= tt\.dot ", line):
            result_layout = re.search(r"-> tensor<[^>]*?, (#\w+)>", line)
            layout = layouts.get(result_layout.group(1), "") if result_layout else ""
            dots["mma.sync" if "nvidia_mma" in layout else "fma"] += 1
    return dict(dots)


_RES_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_report(cubin: bytes) -> dict:
    """Per kernel in a cubin: registers, stack (spill) bytes, static shared memory, local bytes and SASS counts."""
    tools = Path(_triton_dir()) / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    per_fn_sass = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = chunk.partition("\n")
        per_fn_sass[name.strip()] = body
    out = {}
    for name, reg, stack, shared, local in _RES_USAGE.findall(res):
        counts = sass_counts(per_fn_sass.get(name, ""))
        # ptxas -v's "bytes spill stores": the local stores' widths summed (Triton kernels have no local arrays).
        out[name] = dict(registers=int(reg), spill_bytes=counts.pop("spill store bytes", 0),
                         spill_load_bytes=counts.pop("spill load bytes", 0), stack_bytes=int(stack) + int(local),
                         static_shared=int(shared), sass=counts)
    return out


def _triton_dir() -> str:
    import triton

    return os.path.dirname(triton.__file__)


# ---------------------------------------------------------------------------------------------------------------
# Recording launches (interpreter process)
# ---------------------------------------------------------------------------------------------------------------
TARGET = ("cuda", 90, 32)


def _jsonable(value):
    if type(value).__name__ == "dtype":
        return {"dtype": str(value)}
    if type(value).__name__ == "constexpr":
        return _jsonable(value.value)
    if isinstance(value, (tuple, list)):
        return {"tuple": [_jsonable(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r}")


def _unjson(value):
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        return tl.dtype(value["dtype"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_unjson(v) for v in value["tuple"])
    return value


def _shape_of(args) -> list:
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return list(max(tensors, key=lambda t: t.numel()).shape) if tensors else []


def record(workload: Callable[[], None], label: str = "") -> list[dict]:
    """Runs ``workload`` under Triton's interpreter with each kernel launch specialized as the JIT would for sm_90,
    recorded, and not executed. Returns one description per launch (in order). Needs ``TRITON_INTERPRET=1`` set
    before triton was imported. Outputs of the recorded kernels are left as allocated (garbage)."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not knobs.runtime.interpret:
        raise RuntimeError("record() needs TRITON_INTERPRET=1 set before triton is imported")
    backend = make_backend(GPUTarget(*TARGET))
    jits: dict = {}
    launches: list[dict] = []

    def recording_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        if self.fn not in jits:
            jit = JITFunction(self.fn, **self.kwargs)
            jits[self.fn] = (jit, create_function_from_signature(jit.signature, jit.params, backend))
        jit, binder = jits[self.fn]
        # What JITFunction.run does before compiling, on the sm_90 backend instead of the active driver's.
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
        if callable(grid):
            grid = grid(bound_args)
        grid = [int(g) for g in (tuple(grid) + (1, 1))[:3]]
        tensors = [v for v in bound_args.values() if isinstance(v, torch.Tensor)]
        case = runner.current_workload_case()  # launch_workload may name its cases
        launches.append({
            "label": " ".join(filter(None, [label, case])),
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "signature": {k: v for k, v in signature.items()},
            "constexprs": [[list(k), _jsonable(v)] for k, v in constexprs.items()],
            "attrs": [[list(k), v] for k, v in attrs.items()],
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.__dict__.items()},
            "grid": grid,
            "shape": _shape_of(tensors),
        })
        return None

    original = InterpretedFunction.run
    InterpretedFunction.run = recording_run
    try:
        workload()
    finally:
        InterpretedFunction.run = original
    return launches


def spec_key(launch: dict) -> str:
    """Identity of the compiled kernel: everything but the grid, label and shapes."""
    return json.dumps({k: launch[k] for k in ("module", "name", "signature", "constexprs", "attrs", "options")},
                      sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Compiling (a process without the interpreter)
# ---------------------------------------------------------------------------------------------------------------
def compile_one(launch: dict) -> dict:
    """Compiles one recorded specialization for sm_90: resources and counts, or ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        constexprs = {tuple(k): _unjson(v) for k, v in launch["constexprs"]}
        attrs = {tuple(k): v for k, v in launch["attrs"]}
        signature = {k: tuple(v) if isinstance(v, list) else v for k, v in launch["signature"].items()}
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in launch["options"].items()}
        src = ASTSource(fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget(*TARGET), options=options)
        res = next(iter(cubin_report(kernel.asm["cubin"]).values()))
    except Exception as exc:  # every failing launch is reported, not only the first
        return {"error": _error_chain(exc)}
    meta = kernel.metadata
    shared = int(meta.shared) + res.pop("static_shared")
    out = dict(res, shared=shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
               dots=ttgir_dots(kernel.asm["ttgir"]), compile_s=round(time.perf_counter() - start, 1))
    out.update(resident_per_sm(out["registers"], shared, meta.num_warps))
    return out


def _error_chain(exc: BaseException) -> str:
    """The exception and its causes (a nested CompilationError's cause is the real message), cause last."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    text = "\n-- caused by --\n".join(parts)
    return text if len(text) <= 6000 else text[:1500] + "\n...\n" + text[-4500:]


def _compile_main(src: str, dst: str, jobs: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    specs = json.loads(Path(src).read_text())
    if jobs > 1 and len(specs) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(compile_one, specs))
    else:
        results = [compile_one(s) for s in specs]
    Path(dst).write_text(json.dumps(results))


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compile_launches(launches: list[dict], jobs: int | None = None) -> list[dict]:
    """Compiles each distinct specialization among ``launches`` once (in a subprocess without the interpreter) and
    returns the launches with the compile results merged in (``error`` where a compile failed) and their waves."""
    specs: dict[str, dict] = {}
    for launch in launches:
        specs.setdefault(spec_key(launch), launch)
    keys = list(specs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if (REPO / "dlkernels").is_dir():  # a source checkout: its dlkernels, as in this process
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "specs.json", Path(tmp) / "results.json"
        src.write_text(json.dumps([specs[k] for k in keys]))
        proc = subprocess.run([sys.executable, __file__, "--compile", str(src), str(dst), str(jobs or default_jobs())],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compile subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        results = dict(zip(keys, json.loads(dst.read_text())))
    out = []
    for launch in launches:
        row = dict(launch, **results[spec_key(launch)])
        if "error" not in row:
            row.update(waves(math.prod(row["grid"]), row["resident"]))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------
# CUDA C++ kernels
# ---------------------------------------------------------------------------------------------------------------
def nvcc() -> str | None:
    return shutil.which("nvcc")


def nvcc_command(source: Path, output: Path, arch: str = "sm_90", kind: str = "-c") -> list[str]:
    """nvcc for one torch-free kernel source with the flags torch's extension build adds (they remove implicit
    half/bfloat16 conversions) and the ones setup.py adds."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [nvcc(), f"-arch={arch}", "-std=c++17", "-O3", "--expt-relaxed-constexpr", *COMMON_NVCC_FLAGS, kind,
            str(source), "-I", str(CSRC), "-o", str(output)]


def cuda_cpp_reports(sources: list[Path] | None = None) -> list[dict]:
    """Each kernel of each ``csrc/**/*.cu`` compiled to an sm_90 cubin: resources and SASS counts."""
    sources = sorted(CSRC.rglob("*.cu")) if sources is None else sources
    rows = []
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            proc = subprocess.run(nvcc_command(source, cubin, kind="-cubin"), capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"source": str(source.relative_to(REPO)), "error": proc.stderr[-4000:]})
                continue
            for name, res in cubin_report(cubin.read_bytes()).items():
                shared = res.pop("static_shared")
                rows.append(dict(source=str(source.relative_to(REPO)), kernel=_demangle(name), **res, shared=shared))
    return rows


def _demangle(name: str) -> str:
    """``adam_kernel<float, 4>`` from the mangled name: no namespaces, return type or parameter list."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    full = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    full = full.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(full)
    for i, ch in enumerate(full):  # drop the parameter list: the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    short = full[:cut].removeprefix("void ")
    return re.sub(r"\b\w+::", "", short)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def bench_modules(wanted: list[str]) -> list:
    mods = [importlib.import_module(p.stem) for p in sorted(BENCH_DIR.glob("bench_*.py"))]
    return [m for m in mods if not wanted or m.OP in wanted]


def _dtypes(signature: dict) -> str:
    return ",".join(sorted({v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")}))


def named_constexprs(launch: dict) -> dict:
    """A launch's constexpr values by parameter name (block sizes, flags, dtypes)."""
    names = list(launch["signature"])
    return {names[path[0]]: value for path, value in launch["constexprs"] if len(path) == 1}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (label, kernel specialization, grid): launch counts merged."""
    merged: dict[str, dict] = {}
    for row in rows:
        key = json.dumps([row["label"], spec_key(row), row["grid"]])
        if key in merged:
            merged[key]["launches"] += 1
        else:
            merged[key] = dict(row, launches=1)
    return list(merged.values())


def table(rows: list[dict]) -> str:
    lines = ["| op | kernel | dtypes | constexprs | warps/stages | regs | spill B | smem KB | grid | /SM (limit) "
             "| waves (tail) | dots | SASS |", "|" + "---|" * 13]
    for r in rows:
        consts = {k: v for k, v in named_constexprs(r).items()
                  if isinstance(v, int) and not isinstance(v, bool) and (k.isupper() or k == "D")}
        head = (f"| {r['label']} | {r['name']} | {_dtypes(r['signature'])} | "
                f"{' '.join(f'{k}={v}' for k, v in consts.items())} |")
        if "error" in r:
            lines.append(head + f" compile FAILED: {r['error'].splitlines()[0][:150]} |" + " |" * 8)
            continue
        sass = r["sass"]
        shown = ", ".join(f"{k} {v}" for k, v in sass.items())
        dots = ", ".join(f"{k} {v}" for k, v in r["dots"].items()) or "-"
        grid = "x".join(map(str, r["grid"])) + (f" ({r['launches']} launches)" if r.get("launches", 1) > 1 else "")
        lines.append(head + f" {r['num_warps']}/{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared'] / 1024:.1f} | {grid} | {r['resident']} ({r['limited_by']}) | "
                     f"{r['waves']} ({r['tail']}) | {dots} | {shown} |")
    return "\n".join(lines)


def cuda_table(rows: list[dict]) -> str:
    lines = ["| source | kernel | regs | spill B | smem B | SASS |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | compile FAILED: {r['error'].splitlines()[-1][:150]} | | | | |")
            continue
        shown = ", ".join(f"{k} {v}" for k, v in r["sass"].items())
        lines.append(f"| {r['source']} | {r['kernel'][:90]} | {r['registers']} | {r['spill_bytes']} | {r['shared']} "
                     f"| {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops", nargs="*", help="bench module OP names (default: all)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON")
    parser.add_argument("--no-cuda-cpp", action="store_true", help="skip the csrc/ CUDA C++ kernels")
    parser.add_argument("--jobs", type=int, default=default_jobs())
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        # The interpreter must be on before triton is imported: start again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    if (REPO / "dlkernels").is_dir():
        sys.path.insert(0, str(REPO))
    os.environ["DLKERNELS_GPU_LAUNCH_CONFIG"] = "1"
    import dlkernels

    launches, notes = [], []
    for mod in bench_modules(args.ops):
        if not hasattr(mod, "launch_workload"):
            notes.append(f"{mod.OP}: bench module has no launch_workload(): skipped")
            continue
        with dlkernels.backend("triton"):
            launches += record(mod.launch_workload, label=mod.OP)
    rows = summarize(compile_launches(launches, args.jobs))
    print(f"Triton launches at the benchmark shapes, compiled for sm_90 ({len(launches)} launches, "
          f"{len({spec_key(r) for r in rows})} distinct compiles):\n")
    print(table(rows))
    cuda_rows = [] if args.no_cuda_cpp or nvcc() is None else cuda_cpp_reports()
    if cuda_rows:
        print("\nCUDA C++ kernels (csrc/), nvcc -arch=sm_90 with torch's extension flags:\n")
        print(cuda_table(cuda_rows))
    elif not args.no_cuda_cpp:
        notes.append("nvcc not found: CUDA C++ kernels not compiled")
    for note in notes:
        print(note)
    failed = [r for r in rows if "error" in r] + [r for r in cuda_rows if "error" in r]
    spilled = [r for r in rows + cuda_rows if r.get("spill_bytes")]
    print(f"\n{len(failed)} failed compiles, {len(spilled)} kernels with spills")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    import triton

    path.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "limits": SM90,
                                "triton_launches": rows, "cuda_cpp": cuda_rows, "notes": notes}, indent=1))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:  # the compile subprocess
        _compile_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
