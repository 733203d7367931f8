"""``python -m dlkernels info`` (which backends run here) and ``python -m dlkernels bench`` (the main job).

``bench`` on a GPU times every implemented op against PyTorch/cuDNN and prints the table; without a GPU it runs each
op's kernels against eager PyTorch on small shapes through Triton's interpreter and prints a correctness table.
The benchmark modules live in the repository's ``bench/`` folder and ship in the wheel as ``dlkernels.bench``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path



def bench_dir() -> Path:
    """The benchmark modules: the repository's ``bench/`` next to the package (source checkout, editable install),
    else the installed ``dlkernels.bench`` (a wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "bench"
    if (checkout / "runner.py").is_file():
        return checkout
    spec = importlib.util.find_spec("dlkernels.bench")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise SystemExit("dlkernels: the benchmark modules are missing (neither bench/ next to the package nor the "
                     "installed dlkernels.bench)")


def info() -> None:
    import torch

    import dlkernels
    from dlkernels import _backend

    print(f"dlkernels {dlkernels.__version__}  torch {torch.__version__}  cuda {torch.version.cuda}")
    try:
        import triton

        print(f"triton {triton.__version__}  interpreter {'on' if _backend.interpreter_active() else 'off'}")
    except ImportError:
        print("triton: not installed")
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"requested backend: {dlkernels.get_backend()}")
    for name, ok in dlkernels.available_backends().items():
        why = ""
        if name == "cuda" and not ok:
            why = f" ({_backend.cuda_extension_error() or 'no CUDA device'})"
        print(f"  {name:10s} {'available' if ok else 'not available'}{why}")


def bench_modules(only: list[str] | None):
    folder = bench_dir()
    sys.path.insert(0, str(folder))  # bench modules import their shared ``runner`` as a top-level module
    names = sorted(p.stem for p in folder.glob("bench_*.py"))
    mods = {m.OP: m for m in (importlib.import_module(n) for n in names)}
    unknown = [op for op in only or [] if op not in mods]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; benchmarks exist for {sorted(mods)}")
    return [mods[op] for op in only] if only else list(mods.values())  # in the order asked for


def bench(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is imported: start again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = ["bench", *(["--full"] if args.full else []), *(["--ops", args.ops] if args.ops else [])]
        return subprocess.call([sys.executable, "-m", "dlkernels", *argv], env=env)
    mods = bench_modules(args.ops.split(",") if args.ops else None)
    import runner

    if not torch.cuda.is_available():
        print("No GPU here: checking each op's Triton kernels against eager PyTorch on small shapes (interpreter).")
        print("Speed needs a GPU: run `python -m dlkernels bench` (or bash bench/gpu_check.sh) on one.\n")
        results = [c for m in mods for c in m.checks()]
        print(runner.correctness_table(results))
        bad = [c for c in results if not c.ok]
        print(f"\n{len(results) - len(bad)} passed, {len(bad)} failed")
        return 1 if bad else 0
    env = runner.environment()
    ceilings = runner.measure_ceilings()
    print(f"{env['gpu']}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    tables = []
    for m in mods:
        rows = runner.run_cases(m.cases(quick=not args.full), ceilings, env)
        path = runner.save(m.OP, rows, ceilings, env)
        tables.append(runner.markdown_table(rows))
        print(f"{m.OP}: wrote {path}")
    print("\n" + "\n\n".join(tables))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available here")
    b = sub.add_parser("bench", help="benchmark (GPU) or correctness table (CPU) for every op")
    b.add_argument("--full", action="store_true", help="size sweeps instead of the quick set")
    b.add_argument("--ops", help="comma-separated op names, run in that order (default: all)")
    from . import train

    train.add_arguments(sub.add_parser("train", help="train one of dlkernels.models (digits / synthetic data)"))
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "train":
        return train.main(args)
    return bench(args)


def bench_main() -> int:
    """Console script ``dlkernels-bench``: the same as ``dlkernels bench``."""
    return main(["bench", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
