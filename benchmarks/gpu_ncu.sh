#!/usr/bin/env bash
# Nsight Compute on the lent GPU (Firecracker machines read the hardware counters): what holds each
# kernel of benchmarks/ncu_cases.py back (throughput against the peaks, memory traffic by level, warp
# stall reasons, occupancy). One report a case in $OUT/ncu_<case>.txt. Clocks are left alone
# (--clock-control none, METHOD.md). Carry ostquant_vllm/kernels/_build.
#   bash benchmarks/gpu_ncu.sh [case ...]        (default: every case; `python3 benchmarks/ncu_cases.py --list`)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
  --section SourceCounters"  # SourceCounters: the SASS lines where the warps stall (session 10: guessing failed twice)
python3 benchmarks/ncu_cases.py --list | while read -r case regex; do
  if [ $# -gt 0 ] && [[ " $* " != *" $case "* ]]; then continue; fi
  run_case() {
    timeout 120 "$NCU" --clock-control none --kernel-name "regex:$regex" --launch-skip 3 --launch-count 1 \
      $SECTIONS "$@" python3 benchmarks/ncu_cases.py --case "$case" > "$OUT/ncu_$case.txt" 2>&1 < /dev/null
  }
  # NCU_DETAILS=1: the sections' bodies too (ComputeWorkloadAnalysis: the utilization of each pipe, the
  # tensor pipe's among them); without it if this ncu does not know the option
  if [ -n "${NCU_DETAILS:-}" ]; then run_case --print-details all || run_case; else run_case; fi
  echo "$case rc=$? -> ncu_$case.txt"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|No Eligible|Stall" \
    "$OUT/ncu_$case.txt" | head -12
done
