"""The one benchmark runner every ``bench/bench_<op>.py`` uses.

A bench module defines ``OP`` (its name), ``cases(quick: bool) -> list[Case]`` (GPU timings),
``checks() -> list[dlkernels.testing.Comparison]`` (small-shape correctness, run on the CPU through Triton's
interpreter when there is no GPU) and ``launch_workload() -> None`` (the op's public entry points with the Triton
backend at the benchmark shapes on CPU tensors, forward and backward: ``bench/resource_usage.py`` records those
launches without running them and compiles each for sm_90; ``with runner.workload_case(name):`` names them).

This module times cases with CUDA events (``triton.testing.do_bench``: warm-up, median with 20/80 quantiles),
measures the card's ceilings, and writes JSON rows, a markdown table and a PNG plot under ``bench/results/``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

def results_dir() -> Path:
    """``$DLKERNELS_RESULTS``, else ``bench/results`` in a source checkout, else ``./dlkernels-results`` (an installed
    wheel's package folder is no place for results)."""
    if os.environ.get("DLKERNELS_RESULTS"):
        return Path(os.environ["DLKERNELS_RESULTS"])
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").is_file() and (here.parent / "dlkernels").is_dir():
        return here / "results"
    return Path.cwd() / "dlkernels-results"


RESULTS = results_dir()
OURS = "dlkernels"


@dataclass
class Case:
    """One workload timed under several providers. ``providers`` maps a name to a no-argument callable."""

    op: str
    name: str
    mode: str  # fwd | bwd | fwd+bwd | eval | step
    providers: dict[str, Callable[[], object]]
    bytes: float | None = None  # minimal bytes moved, for GB/s
    flops: float | None = None  # useful floating-point operations, for TFLOP/s
    params: dict = field(default_factory=dict)  # shape, dtype, layout... for plots and JSON
    notes: dict = field(default_factory=dict)  # per-provider remarks (which SDPA backend ran, compile time...)


_workload_case = [""]


@contextlib.contextmanager
def workload_case(name: str):
    """Names the kernel launches made inside the block (``launch_workload``), for bench/resource_usage.py's table."""
    previous = _workload_case[0]
    _workload_case[0] = name
    try:
        yield
    finally:
        _workload_case[0] = previous


def current_workload_case() -> str:
    return _workload_case[0]


def rotating(fn: Callable, input_sets: list) -> Callable[[], object]:
    """Calls ``fn(*input_sets[i])`` for i cycling, so repeated timings do not run out of a warm cache."""
    state = {"i": 0}

    def call():
        args = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return fn(*args)

    return call


def rotation_count(bytes_per_set: float, cache_bytes: float = 120e6) -> int:
    """How many input sets it takes to exceed the L2 cache (H100/H200: 50-60 MB), at least 1, at most 8."""
    return max(1, min(8, math.ceil(cache_bytes / max(bytes_per_set, 1.0))))


def environment() -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) in ms, from CUDA events after warm-up."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _copy_ms(numel: int) -> float:
    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return time_ms(lambda: y.copy_(x))[0]


def _matmul_ms(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return time_ms(lambda: a @ b)[0]


def measure_ceilings() -> dict:
    """The card's copy bandwidth (1 GiB bf16 device copy, read + write) and bf16 matmul rate (8192^3).

    With ``$DLKERNELS_CEILINGS`` naming a file, a measurement stored there for this GPU is reused, else stored
    (bench/gpu_check.sh runs each op in its own process: one measurement for all)."""
    cache = Path(os.environ["DLKERNELS_CEILINGS"]) if os.environ.get("DLKERNELS_CEILINGS") else None
    gpu = torch.cuda.get_device_name()
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("gpu") == gpu:
            return stored["ceilings"]
    numel, n = 512 * 1024 * 1024, 8192
    ceilings = {
        "copy_GBps": 2 * numel * 2 / _copy_ms(numel) / 1e6,
        "bf16_mm_TFLOPs": 2 * n**3 / _matmul_ms(n) / 1e9,
    }
    torch.cuda.empty_cache()
    if cache is not None:
        cache.write_text(json.dumps({"gpu": gpu, "ceilings": ceilings}))
    return ceilings


def run_cases(cases: list[Case], ceilings: dict, env: dict) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="bench", unit="case"):
        times = {}
        for provider, fn in case.providers.items():
            try:
                times[provider] = time_ms(fn)
            except Exception as exc:  # a provider that cannot run this case (no backend, compile error) is recorded
                times[provider] = exc
            torch.cuda.synchronize()
        for provider, t in times.items():
            row = {**env, "op": case.op, "case": case.name, "mode": case.mode, "provider": provider, **case.params}
            row["work"] = case.flops or case.bytes
            if isinstance(t, Exception):
                row["error"] = f"{type(t).__name__}: {str(t).splitlines()[0][:200] if str(t) else ''}"
                rows.append(row)
                continue
            med, p20, p80 = t
            row.update(ms=med, ms_p20=p20, ms_p80=p80)
            if case.bytes:
                row["GBps"] = case.bytes / med / 1e6
                row["pct_copy_bw"] = 100 * row["GBps"] / ceilings["copy_GBps"]
            if case.flops:
                row["TFLOPs"] = case.flops / med / 1e9
                row["pct_bf16_mm"] = 100 * row["TFLOPs"] / ceilings["bf16_mm_TFLOPs"]
            row["speedup_vs"] = {
                other: ot[0] / med for other, ot in times.items() if other != provider and not isinstance(ot, Exception)
            }
            if provider in case.notes:
                row["note"] = case.notes[provider]
            rows.append(row)
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def markdown_table(rows: list[dict]) -> str:
    """One line per (case, mode) for our provider: time, speedup against every other provider, bandwidth or rate."""
    lines = ["| op | case | mode | dlkernels ms | speedup vs others | achieved |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["provider"] != OURS:
            continue
        if "error" in row:
            lines.append(f"| {row['op']} | {row['case']} | {row['mode']} | error: {row['error']} | | |")
            continue
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup_vs"].items())
        achieved = []
        if "GBps" in row:
            achieved.append(f"{row['GBps']:.0f} GB/s ({row['pct_copy_bw']:.0f}% copy)")
        if "TFLOPs" in row:
            achieved.append(f"{row['TFLOPs']:.1f} TFLOP/s ({row['pct_bf16_mm']:.0f}% bf16 mm)")
        lines.append(
            f"| {row['op']} | {row['case']} | {row['mode']} | {row['ms']:.4f} | {speed} | {'; '.join(achieved)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time against work (bytes or FLOPs) per provider and mode, log-log: shows how cost grows with size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows if "ms" in r})
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r["provider"] for r in rows}):
            pts = sorted(
                (r["work"] or i, r["ms"])
                for i, r in enumerate(rows)
                if r["mode"] == mode and r["provider"] == provider and "ms" in r
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{rows[0]['op']} {mode}")
        ax.set_xlabel("work (FLOPs or bytes)")
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(op: str, rows: list[dict], ceilings: dict, env: dict) -> Path:
    """Writes ``bench/results/<op>-<gpu>-<date>.{json,md,png}``; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{op}-{_slug(env['gpu'])}-{env['date']}"
    payload = {"env": env, "ceilings": ceilings, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    stem.with_suffix(".md").write_text(
        f"# {op} on {env['gpu']} ({env['date']})\n\ntorch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']};"
        f" copy {ceilings['copy_GBps']:.0f} GB/s, bf16 mm {ceilings['bf16_mm_TFLOPs']:.0f} TFLOP/s\n\n"
        + markdown_table(rows)
        + "\n"
    )
    plot(rows, stem.with_suffix(".png"))
    out = os.environ.get("OUT")
    if out:
        for suffix in (".json", ".md", ".png"):
            src = stem.with_suffix(suffix)
            if src.exists():
                (Path(out) / src.name).write_bytes(src.read_bytes())
    return stem.with_suffix(".json")


def correctness_table(results: list) -> str:
    """Markdown table of ``Comparison`` results from the CPU checks."""
    lines = ["| check | dtype | error vs fp64 | eager error | x eager | budget | ok |", "|---|---|---|---|---|---|---|"]
    for c in results:
        dtype = str(c.dtype).replace("torch.", "")
        lines.append(
            f"| {c.name} | {dtype} | {c.error:.2e} | {c.eager_error:.2e} | {c.ratio:.2f} | {c.budget:.2e} |"
            f" {'yes' if c.ok else 'NO'} |"
        )
    return "\n".join(lines)


def main_for(module) -> int:
    """``python bench/bench_<op>.py``: the main job for that op alone."""
    from dlkernels.__main__ import main

    return main(["bench", "--ops", module.OP])
