#!/usr/bin/env bash
# The GPU engine's whole check on one lent GPU machine, in one call (~9 minutes):
#
#   1. build prh_fast from source, offline, with its CUDA kernels for sm_90
#      (pip install --no-build-isolation --no-deps --no-index -e .; setup.py build_ext
#      --inplace if pip cannot; a CPU-only build if nvcc fails, so the Triton checks still run)
#   2. the GPU tests: tests/test_cuda.py (compiled Triton search vs the float64 oracle and the
#      native CPU backend at N = 20,000; CUDA neighbour-set / CKNNA kernels vs the CPU kernels;
#      nvcc and call-checking checks), the cuda-marked tests of test_knn/test_metrics/
#      test_prepare, and test_native's CUDA entry points
#   3. python -m benchmarks.bench_knn --suite gpu: ceilings, the issue's grid, list checks on row
#      samples (time-guarded: long runs are timed on a row sample and flagged)
#   4. python -m benchmarks.bench_grid_gpu twice: all 33 x 25 layers at N = 65,536, and N = 1,048,576
#      with one layer per model (kNN at full size) scored as 33 x 25 replicated layers
#   5. a summary table (printed last, and summary.md)
#
# Usage (device tool, from the repository root):   bash benchmarks/gpu_suite.sh
# Environment: OUT (results folder; default ./gpu_suite_out), PRH_SUITE_BUDGET (seconds,
# default 540), PRH_SUITE_GUARD (seconds one benchmark run may take, default 20),
# PRH_SUITE_DRY=1 (no GPU: skip the build, run the benchmarks' tiny CPU modes; tests the
# script itself).
# Writes at most 7 files to $OUT: suite.log, build.log, tests.log, bench_knn_gpu.json,
# bench_grid_gpu_n65536.json, bench_grid_gpu.json, summary.md. It never changes the GPU's
# settings (clocks, power, MIG, persistence) and never resets it.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
BUDGET="${PRH_SUITE_BUDGET:-540}"
GUARD="${PRH_SUITE_GUARD:-20}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
: >"$LOG"
declare -A STATUS

log() { echo "[suite +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
# run NAME SECONDS LOGFILE CMD...: time-limited, output to LOGFILE and the suite log
run() {
  local name=$1 limit=$2 file=$3
  shift 3
  if [ "$limit" -lt 5 ]; then
    log "$name: skipped (no time left)"
    STATUS[$name]="skipped (no time left)"
    return 1
  fi
  log "$name: start (limit ${limit}s): $*"
  if [ "$file" = "$LOG" ]; then
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  else
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$file" >>"$LOG"
  fi
  local rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc$([ "$rc" = 124 ] && echo ' (timed out)')"
  log "$name: ${STATUS[$name]}"
  return "$rc"
}

# ---- 0. the machine
log "prh_fast GPU suite; budget ${BUDGET}s, guard ${GUARD}s, OUT=$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
  nvidia-smi -L
  command -v nvcc && nvcc --version | tail -2
  cmake --version | head -1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  "$PY" -c "import importlib.util as u; print('faiss', u.find_spec('faiss') is not None)"
  git rev-parse --short HEAD 2>/dev/null || echo "git revision: unknown (no .git here)"
} >>"$LOG" 2>&1

# ---- 1. build
export PRH_FAST_CUDA=1 PRH_FAST_CUDA_ARCHS="${PRH_FAST_CUDA_ARCHS:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
BUILD_LOG="$OUT/build.log"
: >"$BUILD_LOG"
built=0
DRY="${PRH_SUITE_DRY:-0}"
if [ "$DRY" = 1 ]; then
  log "dry run: no build, tiny CPU benchmarks"
  built=1
elif run build_pip 240 "$BUILD_LOG" "$PY" -m pip install --no-build-isolation --no-deps \
    --no-index -e .; then
  built=1
else
  log "pip install failed; trying setup.py build_ext --inplace"
  if run build_inplace 240 "$BUILD_LOG" "$PY" setup.py build_ext --inplace; then
    built=1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "CUDA build failed; building the CPU kernels only (Triton checks still run)"
    export PRH_FAST_CUDA=0
    run build_cpu_only 240 "$BUILD_LOG" "$PY" setup.py build_ext --inplace && built=1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$PY" -c "import prh_fast; from prh_fast._info import info; info()" 2>&1 | tee -a "$LOG"
HAS_CUDA_KERNELS=$("$PY" -c "from prh_fast import _native; print(int(_native.HAS_CUDA_KERNELS))" 2>/dev/null || echo 0)
log "built=$built cuda_kernels=$HAS_CUDA_KERNELS"

# ---- 2. GPU tests (the moderate-size oracle checks are in tests/test_cuda.py)
TESTS_LOG="$OUT/tests.log"
: >"$TESTS_LOG"
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=240)
T_LIMIT=$(( $(left) - 300 ))
[ "$T_LIMIT" -gt 220 ] && T_LIMIT=220
run tests_cuda "$T_LIMIT" "$TESTS_LOG" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
  "${TIMEOUT_OPT[@]}" tests/test_cuda.py \
  "tests/test_native.py::test_cuda_entry_points_validate_before_touching_the_device"
T_LIMIT=$(( $(left) - 260 ))
[ "$T_LIMIT" -gt 60 ] && T_LIMIT=60
run tests_marked "$T_LIMIT" "$TESTS_LOG" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
  "${TIMEOUT_OPT[@]}" -m cuda tests/test_knn.py tests/test_metrics.py tests/test_prepare.py

KNN_ARGS=(--suite gpu --guard "$GUARD" --sweep)
GRID_ARGS=()
if [ "$DRY" = 1 ]; then
  KNN_ARGS=(--suite gpu --device cpu --small --n 96 160 --d 16 --k 4 --check-rows 24)
  GRID_ARGS=(--device cpu --small --n 160)
fi

# ---- 3. kNN grid (leaves ~200 s for the layer grids)
KNN_END=$(( DEADLINE - 200 ))
run bench_knn $(( KNN_END - $(date +%s) + 20 )) "$LOG" "$PY" -m benchmarks.bench_knn \
  "${KNN_ARGS[@]}" --deadline "$KNN_END" --out "$OUT" --name bench_knn_gpu

# ---- 4. layer grids: all 825 pairs at N = 65,536; then kNN at N = 2^20, scored as 33 x 25
G1_END=$(( $(date +%s) + ($(left) - 20) / 4 ))
run grid_n65536 $(( G1_END - $(date +%s) + 15 )) "$LOG" "$PY" -m benchmarks.bench_grid_gpu \
  --n 65536 "${GRID_ARGS[@]}" --deadline "$G1_END" --out "$OUT" --name bench_grid_gpu_n65536
G2_END=$(( DEADLINE - 15 ))
run grid_n1m $(( G2_END - $(date +%s) + 10 )) "$LOG" "$PY" -m benchmarks.bench_grid_gpu \
  --layers 1 1 --replicate-to 33 25 "${GRID_ARGS[@]}" --deadline "$G2_END" --out "$OUT" \
  --name bench_grid_gpu

# ---- 5. summary
log "statuses: $(for k in "${!STATUS[@]}"; do printf '%s=%s; ' "$k" "${STATUS[$k]}"; done)"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("# GPU suite summary\n")
t = out / "tests.log"
if t.exists():
    import re
    tail = [l.strip("= ") for l in t.read_text().splitlines()
            if re.search(r" in [0-9.]+s( \(.*\))?( =+)?$", l)]
    print("tests (tests_cuda | tests_marked):", " | ".join(tail) or "no pytest summary line",
          "\n")
k = out / "bench_knn_gpu.json"
if k.exists():
    d = json.loads(k.read_text())
    c = d["ceilings"]
    print(f"ceilings (torch.mm {c['size']}^3): bf16 {c['bf16']:.4g}, tf32 {c['tf32']:.4g}, "
          f"fp32 {c['fp32']:.4g} TFLOP/s; device {d['gpu'].get('gpu')}; knn checks_passed: "
          f"{d['checks_passed']}\n")
    print("| mode | N | D | k | s | TFLOP/s | % ceil | peak GiB | =fp64 | =fp32 | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        if r.get("status") != "ok":
            print(f"| {r.get('mode')} | {r.get('N')} | {r.get('D')} | {r.get('k')} | "
                  f"{r.get('status')}: {str(r.get('reason') or '')[:60]} |||||||")
            continue
        ch = r.get("check", {})
        ext = " (rows " + str(r["timed_rows"]) + ", scaled)" if r.get("extrapolated") else ""
        pk = r.get("peak_gib")
        print(f"| {r['mode']}{' ' + str(r.get('tune')) if r.get('tune') else ''} | {r['N']} | "
              f"{r['D']} | {r['k']} | {r['seconds']:.3f}{ext} | {r['tflops']:.4g} | "
              f"{100 * r.get('frac_ceiling', 0):.0f} | "
              f"{'' if pk is None else format(pk, '.1f')} | "
              f"{ch.get('rows_equal_fp64')}/{ch.get('sample_rows')} | "
              f"{ch.get('rows_equal_fp32')} | {ch.get('recall_fp64', 0):.4f} |")
for name in ("bench_grid_gpu_n65536", "bench_grid_gpu"):
    g = out / f"{name}.json"
    if not g.exists():
        continue
    d = json.loads(g.read_text())
    sc = d.get("scores") or {}
    ok = [l for l in d["layers"] if l.get("status") == "ok"]
    knn_s = sum(l["knn_seconds"] for l in ok)
    print(f"\n{name}: N {d['args']['n']}, layers done {len(ok)}/"
          f"{sum(d['args']['layers'])}, kNN {knn_s:.1f} s in all; "
          f"{sc.get('pairs')} pairs ({sc.get('setops')}"
          f"{', replicated' if sc.get('replicated') else ''}) in {sc.get('seconds', 0):.3f} s; "
          f"mutual_knn mean {sc.get('mean', float('nan')):.4f}; peak {d.get('peak')}; "
          f"checks_passed {d.get('checks_passed')}; wall {d.get('wall_seconds', 0):.0f} s")
    if "projection" in d:
        pr = d["projection"]
        print(f"  projection (not measured) of {pr['layers'][0]} x {pr['layers'][1]} layers at "
              f"N {pr['n']}: {pr['seconds']:.0f} s")
EOF
log "done in $(( $(date +%s) - START ))s"
