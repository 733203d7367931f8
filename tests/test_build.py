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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", str(source)]
    _run(cmd + [f"-I{p}" for p in includes])

