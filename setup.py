"""Build script: the pure-Python package always, plus the CUDA extension ``dlkernels._C`` when it can be built.

Environment:
  DLKERNELS_SKIP_CUDA_BUILD=1   never build ``_C`` (pure-Python install in seconds)
  DLKERNELS_FORCE_CUDA_BUILD=1  build ``_C`` even without a visible GPU (needs a CUDA torch and nvcc)
  TORCH_CUDA_ARCH_LIST          target archs (default "8.0;9.0")
  MAX_JOBS                      parallel compile jobs for ninja
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[dlkernels setup] {msg}", flush=True)


def _cuda_sources():
    return sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cu", "csrc/**/*.cpp")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def _extension_plan():
    """Returns (ext_modules, cmdclass) and says why."""
    if os.environ.get("DLKERNELS_SKIP_CUDA_BUILD") == "1":
        _say("DLKERNELS_SKIP_CUDA_BUILD=1: skipping the CUDA extension; Triton and reference backends only")
        return [], {}
    sources = _cuda_sources()
    if not sources:
        _say("no sources in csrc/: pure-Python install")
        return [], {}
    force = os.environ.get("DLKERNELS_FORCE_CUDA_BUILD") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable in the build environment (use --no-build-isolation): pure-Python install")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: pure-Python install")
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        _say("nvcc not found (set CUDA_HOME): pure-Python install")
        return [], {}
    if not force and not torch.cuda.is_available():
        _say("CUDA torch but no visible GPU: skipping _C (set DLKERNELS_FORCE_CUDA_BUILD=1 to build anyway)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _say(
        f"building dlkernels._C from {len(sources)} sources for archs {os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"with MAX_JOBS={os.environ.get('MAX_JOBS', 'default')} (torch {torch.__version__}, nvcc {nvcc})"
    )
    ext = CUDAExtension(
        name="dlkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # dlkernels._C.torch_version: `import dlkernels` compares it with the running torch (an extension built
        # against another torch is not used; the Triton kernels run instead, with a warning).
        # Passed bare and stringified in C++: quotes do not survive every build tool's command line.
        define_macros=[("DLKERNELS_TORCH_VERSION", torch.__version__)],
        # No -std flag: BuildExtension adds the one the installed torch needs (C++17, or C++20 from torch 2.14).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_plan()
setup(
    # The benchmark modules ship as dlkernels.bench (the repository keeps them in bench/), so the `dlkernels bench`
    # and `dlkernels-bench` commands work from an installed wheel.
    packages=find_packages(include=["dlkernels", "dlkernels.*"]) + ["dlkernels.bench"],
    package_dir={"dlkernels.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
