#!/usr/bin/env bash
# One command for a lent GPU machine (no network; torch, triton, nvcc, ninja, pybind11, pytest preinstalled):
# build the CUDA extension with all cores, run the GPU tests, run the quick benchmark, copy logs and results to $OUT,
# print a compact summary last. Each phase has its own time limit so the summary always prints (about 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dlkernels-gpu-check}
mkdir -p "$OUT"
export OUT MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
t0=$(date +%s)
phase() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv > "$OUT/nvidia-smi.csv" 2>&1
phase "build (MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST)"
timeout 240 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1
build_rc=$?
grep "\[dlkernels setup\]" "$OUT/install.log"
"$PY" -m dlkernels info | tee "$OUT/info.txt"

phase "GPU tests"
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?

phase "quick benchmark"
timeout 240 "$PY" -m dlkernels bench > "$OUT/bench.log" 2>&1
bench_rc=$?
cp bench/results/*.json bench/results/*.md "$OUT/" 2>/dev/null

phase "done"
echo
echo "== summary ($(head -2 "$OUT/nvidia-smi.csv" | tail -1)) =="
echo "build rc=$build_rc  gpu tests rc=$tests_rc  bench rc=$bench_rc  ($(( $(date +%s) - t0 ))s)"
tail -1 "$OUT/gpu-tests.log"
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -20
grep -E "copy .* GB/s" "$OUT/bench.log" | head -1
grep -E "^\| " "$OUT/bench.log" | grep -v "^| op " | grep -v "^|---" | cut -c1-220
[ $build_rc -eq 0 ] && [ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
