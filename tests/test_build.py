"""Compile-checks every CUDA source in csrc/ with nvcc (and the torch bindings with the host compiler), so a machine
without a GPU still catches CUDA compile errors. Skipped where nvcc is missing."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import resource_usage  # noqa: E402

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
CU_SOURCES = sorted(CSRC.rglob("*.cu"))
CPP_SOURCES = sorted(CSRC.rglob("*.cpp"))


def _cuda_include() -> str:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(NVCC).resolve().parent.parent)]
    for home in filter(None, candidates):
        if (Path(home) / "include" / "cuda_runtime.h").exists():
            return str(Path(home) / "include")
    pytest.skip("CUDA headers not found (set CUDA_HOME)")


def _run(cmd):
    _run_env(cmd, None)


def _run_env(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_kernel_compiles(source, tmp_path):
    # Kernel sources are torch-free: only csrc/ and the CUDA headers, with the flags torch's extension build adds
    # (one command, shared with bench/resource_usage.py, which reports the kernels' registers and spills).
    _run(resource_usage.nvcc_command(source, tmp_path / "k.o"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CPP_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_binding_compiles(source):
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "g++")
    includes = [*include_paths(), str(CSRC), _cuda_include(), sysconfig.get_paths()["include"]]
    import torch

    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
           f"-DDLKERNELS_TORCH_VERSION={torch.__version__}", str(source)]  # as setup.py defines it
    _run(cmd + [f"-I{p}" for p in includes])



def test_wheel_ships_the_benchmarks_and_declares_numpy(tmp_path):
    """A pure-Python wheel (the supported `--no-build-isolation` build, `_C` skipped) carries bench/ as
    dlkernels.bench, so `dlkernels bench` finds its modules when installed; numpy (Triton's interpreter) is declared."""
    import zipfile

    pytest.importorskip("setuptools")
    root = CSRC.parent
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                              "results", ".pytest_cache", "*.so"))
    env = dict(os.environ, DLKERNELS_SKIP_CUDA_BUILD="1")
    _run_env([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
              str(tmp_path / "dist"), str(src)], env)
    (wheel,) = (tmp_path / "dist").glob("dlkernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        zf.extractall(tmp_path / "site")
    shipped = {Path(n).name for n in names if n.startswith("dlkernels/bench/")}
    assert {"runner.py", "resource_usage.py"} | {p.name for p in (root / "bench").glob("bench_*.py")} <= shipped
    assert "Requires-Dist: numpy" in metadata
    # The installed package (not this checkout) finds and imports its benchmark modules from any directory.
    code = ("import dlkernels, dlkernels.__main__ as m; mods = m.bench_modules(None); "
            "print(dlkernels.__file__, m.bench_dir(), sorted(x.OP for x in mods))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    package_file, bench, ops = out.stdout.split(" ", 2)
    assert package_file.startswith(str(tmp_path / "site")) and bench == str(tmp_path / "site" / "dlkernels" / "bench")
    assert "batch_norm" in ops
