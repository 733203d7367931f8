#!/usr/bin/env bash
# One command for a lent GPU machine (no network; torch, triton, nvcc, ninja, pybind11, pytest preinstalled):
# build the CUDA extension with all cores, run the GPU tests, benchmark every op (quick set), copy logs and results to
# $OUT, print a compact summary last. Everything fits the device tool's 600 s per call: each phase has a cap (build
# 150 s, tests 180 s) and the whole run a deadline (DEADLINE, 560 s); the benchmark runs one op per process,
# cheapest first, each capped by its own limit and by the time left. Ops that did not fit are named in the summary:
# rerun them with e.g. PHASES=bench BENCH_OPS="attention models" (the build stays on a warm machine).
#   PHASES="build tests bench"      which phases to run (default: all three)
#   BENCH_OPS="op[:seconds] ..."    benchmark order and caps; bench modules not named run last with DEFAULT_CAP
#   TESTS_CAP=seconds               the GPU tests' cap (default 180)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dlkernels-gpu-check}
mkdir -p "$OUT"
export OUT MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export DLKERNELS_CEILINGS="$OUT/ceilings.json"  # the card's copy/matmul ceilings, measured once for every op
PHASES=${PHASES:-build tests bench}
# Cheapest first; one word per op ("op" or "op:seconds"). An op without a bench module yet is skipped.
BENCH_OPS=${BENCH_OPS:-batch_norm:45 optim:60 lstm:60 conv:60 attention:150 models:90}
DEFAULT_CAP=${DEFAULT_CAP:-60}
DEADLINE=${DEADLINE:-560}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
phase() { echo "[gpu_check +$(elapsed)s] $*"; }
wants() { [[ " $PHASES " == *" $1 "* ]]; }
cap() { local left=$(( DEADLINE - $(elapsed) )); (( left < $1 )) && echo "$left" || echo "$1"; }
build_rc=skipped tests_rc=skipped
bench_status=() not_run=()

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv > "$OUT/nvidia-smi.csv" 2>&1
if wants build; then
  phase "build (MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST)"
  timeout "$(cap 150)" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1
  build_rc=$?
  grep "\[dlkernels setup\]" "$OUT/install.log"
fi
"$PY" -m dlkernels info | tee "$OUT/info.txt"

if wants tests; then
  phase "GPU tests"
  # -v: one line per test as it finishes, so a run stopped by the cap still says what passed and what failed.
  timeout "$(cap "${TESTS_CAP:-180}")" "$PY" -m pytest -v -m gpu -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
  tests_rc=$?
fi

if wants bench; then
  # The named order, then any bench module not named (a new op runs even before it is added to BENCH_OPS).
  plan=()
  for word in $BENCH_OPS; do plan+=("$word"); done
  for f in bench/bench_*.py; do
    op=$(sed -nE "s/^OP = [\"']([A-Za-z0-9_]+)[\"'].*/\1/p" "$f")
    [[ -n "$op" && " $BENCH_OPS " != *" $op "* && " $BENCH_OPS " != *" $op:"* ]] && plan+=("$op:$DEFAULT_CAP")
  done
  for word in "${plan[@]}"; do
    op=${word%%:*}
    limit=${word#*:}; [[ "$word" == *:* ]] || limit=$DEFAULT_CAP
    grep -qE "^OP = [\"']$op[\"']" bench/bench_*.py 2>/dev/null || continue  # no bench module for it (yet)
    if (( DEADLINE - $(elapsed) < 15 )); then not_run+=("$op"); continue; fi
    left=$(cap "$limit")
    phase "benchmark $op (cap ${left}s)"
    timeout "$left" "$PY" -m dlkernels bench --ops "$op" > "$OUT/bench-$op.log" 2>&1
    rc=$?
    bench_status+=("$op rc=$rc$([ $rc -eq 124 ] && echo ' (time cap)')")
  done
  for f in bench/results/lstm-*.json; do  # LSTM: µs per step of every provider, plotted against T and B
    [ -e "$f" ] && "$PY" bench/bench_lstm.py --per-step "$f" > "$OUT/lstm-per-step.md" 2>&1
  done
  cp bench/results/*-per-step.png "$OUT/" 2>/dev/null
  cp bench/results/*.json bench/results/*.md "$OUT/" 2>/dev/null
fi

phase "done"
echo
echo "== summary ($(head -2 "$OUT/nvidia-smi.csv" | tail -1)) =="
echo "build rc=$build_rc  gpu tests rc=$tests_rc  ($(elapsed)s)"
echo "bench: ${bench_status[*]:-skipped}"
if (( ${#not_run[@]} )); then
  echo "NOT RUN (out of time): ${not_run[*]} -> rerun: PHASES=bench BENCH_OPS=\"${not_run[*]}\" bash bench/gpu_check.sh"
fi
if [ "$tests_rc" = 124 ]; then
  echo "GPU tests stopped at their cap after $(grep -cE " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu-tests.log") tests" \
    "-> rerun: PHASES=tests TESTS_CAP=500 bash bench/gpu_check.sh"
fi
tail -1 "$OUT/gpu-tests.log" 2>/dev/null
grep -E "(^(FAILED|ERROR) | (FAILED|ERROR)( |$))" "$OUT/gpu-tests.log" 2>/dev/null | head -20
grep -hE "copy .* GB/s" "$OUT"/bench-*.log 2>/dev/null | head -1
for log in "$OUT"/bench-*.log; do
  [ -e "$log" ] || continue
  grep -E "^\| " "$log" | grep -v "^| op " | grep -v "^|---" | cut -c1-220
done
status=0
for rc in $build_rc $tests_rc; do [ "$rc" = skipped ] || [ "$rc" -eq 0 ] || status=1; done
for s in "${bench_status[@]}"; do [[ "$s" == *" rc=0" ]] || status=1; done
(( ${#not_run[@]} )) && status=1
exit $status
