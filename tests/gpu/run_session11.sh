#!/usr/bin/env bash
# Device calls (prepared in sessions 10-11) for what was built but not yet measured: kinds 6 and 22-25
# (the pipelined wgmma in CUTLASS's mixed-input RS order: 128-token tiles, and the cluster kinds 13-16's
# tiles), the fused Hadamard's version 5, and the KV4 decode with its block-table entries prefetched a lane
# each and splits of one tile a warp. Three parts, each one call under the 600 s limit, back to back on the
# warm machine (carry ostquant_vllm/kernels/_build on the first only: later calls find it there):
#   PART=tests  the pipelined kinds' and version 5's tests alone first (a fault cannot take the rest down),
#               then every GPU kernel test, the KV4 tests and our KV4 decode timings (no vLLM needed)
#   PART=bench  the Hadamard benchmark, the 16-128-token and large-M GEMM rows
#   PART=ncu    Nsight Compute with the SASS-level stall sampling
#   PART=followup  what the first three led to (below)
# PIPE_OK=0 / HAD5_OK=0 (what PART=tests found) leave those kernels out of the later parts.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/gpu/env.sh  # $OUT, PYTHONPATH, pytest
PIPE_OK=${PIPE_OK:-1} HAD5_OK=${HAD5_OK:-1}
PIPE_SEL="each_kernel and (-6] or -22] or -23] or -24] or -25])"
case "${PART:-tests}" in
tests)
  PT="python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py"
  timeout 100 $PT -k "$PIPE_SEL" 2>&1 | tee "$OUT/tests_pipe.log" | tail -6
  [ "${PIPESTATUS[0]}" = 0 ] || PIPE_OK=0
  timeout 80 $PT -k "quantize_hadamard and -5]" 2>&1 | tee "$OUT/tests_had5.log" | tail -6
  [ "${PIPESTATUS[0]}" = 0 ] || HAD5_OK=0
  echo "PIPE_OK=$PIPE_OK HAD5_OK=$HAD5_OK"
  TESTS="quantize or compile or deterministic or gemm"
  [ "$PIPE_OK" = 1 ] || TESTS="($TESTS) and not ($PIPE_SEL)"
  [ "$HAD5_OK" = 1 ] || TESTS="($TESTS) and not (quantize_hadamard and -5])"
  SKIP_BENCH=1 TESTS="$TESTS" bash tests/gpu/run_kernels.sh 2>&1 | tail -8
  timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py 2>&1 \
    | tee "$OUT/tests_kv4.log" | tail -4
  timeout 120 python3 -m benchmarks.kv4_attention --ours-only --out "$OUT/kv4_attention_ours.json" 2>&1 | tail -14
  ;;
bench)
  [ "$PIPE_OK" = 1 ] || export OSTQUANT_BENCH_SKIP_KINDS=6,22,23,24,25
  timeout 120 python3 benchmarks/kernels.py --models "" --hadamard-only --out "$OUT/kernels_hadamard.json" 2>&1 \
    | grep -E "K=14336 had=(1|8) .*M= *(16|2048|8192)|failed" | tail -40
  timeout 200 python3 benchmarks/kernels.py --models llama3-8b --ms 16,24,32,48,64,96,128 --skip-quant --quick \
    --out "$OUT/kernels_midm.json" 2>&1 | grep -E "M= *(24|64|128) .*(w4a4 |wg13|wp2|fp8)|failed" | tail -40
  timeout 240 python3 benchmarks/kernels.py --skip-quant --ms 2048,8192 --out "$OUT/kernels_large_m.json" 2>&1 \
    | grep -E "(w4a4 |wg5|wg6|bf16) |failed" | tail -60
  ;;
ncu)
  CASES="gemm5_gate_up_m8192 gemm13_gate_up_m64 had1_m8192_k14336 kv4_b1_ctx4096"
  [ "$PIPE_OK" = 1 ] && CASES="$CASES gemm6_gate_up_m8192 gemm22_gate_up_m64"
  [ "$HAD5_OK" = 1 ] && CASES="$CASES had1v5_m8192_k14336"
  timeout 580 bash benchmarks/gpu_ncu.sh $CASES 2>&1 | tail -80
  ;;
followup)  # session 11's second call: kind 26 (128 x 256 pipelined tiles), the KV4 decode's conflict-free
  # shared memory, version 5 in the automatic Hadamard choice; tests, timings and Nsight Compute in one call
  PT="python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py"
  timeout 100 $PT -k "each_kernel and -26]" 2>&1 | tee "$OUT/tests_k26.log" | tail -4
  K26_OK=$([ "${PIPESTATUS[0]}" = 0 ] && echo 1 || echo 0)
  [ "$K26_OK" = 1 ] || export OSTQUANT_BENCH_SKIP_KINDS=26
  timeout 150 $PT -k "not (each_kernel and -26])" 2>&1 | tee "$OUT/tests.log" | tail -4
  timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py 2>&1 \
    | tee "$OUT/tests_kv4.log" | tail -3
  timeout 100 python3 -m benchmarks.kv4_attention --ours-only --out "$OUT/kv4_attention_ours.json" 2>&1 | tail -13
  OSTQUANT_KV4_MIN_TILES=16 timeout 60 python3 -m benchmarks.kv4_attention --ours-only --batches 1,16 \
    --out "$OUT/kv4_attention_ours_min16.json" 2>&1 | tail -7  # session 10's least split (256 tokens)
  timeout 200 python3 benchmarks/kernels.py --skip-quant --ms 2048,8192 --out "$OUT/kernels_large_m.json" 2>&1 \
    | grep -E "(w4a4 |wg5|wg6|wp26|bf16) |failed" | tail -80
  timeout 100 python3 benchmarks/kernels.py --models llama3-8b --ms 16,24,32,48,64,96,128 --skip-quant --quick \
    --out "$OUT/kernels_midm.json" 2>&1 | grep -E "M= *(24|64|128) .*(w4a4 |fp8)|failed" | tail -20
  timeout 60 python3 benchmarks/kernels.py --models "" --hadamard-only --out "$OUT/kernels_hadamard.json" 2>&1 \
    | grep -E "K=14336 had=1 .*M= *(1|16|8192) .*(had|v5|copy)|failed" | tail -20
  CASES="kv4_b1_ctx4096"
  [ "$K26_OK" = 1 ] && CASES="$CASES gemm26_gate_up_m8192"
  timeout 150 bash benchmarks/gpu_ncu.sh $CASES 2>&1 | tail -30
  ;;
esac
