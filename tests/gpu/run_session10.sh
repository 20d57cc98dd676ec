#!/usr/bin/env bash
# One device call (prepared in session 9): the warp-specialized wgmma GEMMs (kinds 17-21) and the
# cluster kinds (13-16) first in their own process (a hang or fault cannot take the rest down), then the
# GPU tests (run_kernels.sh: quantize, compile, deterministic, gemm; the KV4 kernels: the decode
# prologue/epilogue now rotate with warp shuffles), the 16-128-token and the large-M
# GEMM rows of every kind (Llama-3-8B), and Nsight Compute on the kernels that miss their bars
# (benchmarks/gpu_ncu.sh). Session 10 added the fused Hadamard's version 5 (its tests alone first, then
# the Hadamard benchmark).
# Carry ostquant_vllm/kernels/_build.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site ostquant_vllm/kernels/_build/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; }
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
  -k "each_kernel and (-13] or -14] or -15] or -16] or -17] or -18] or -19] or -20] or -21])" 2>&1 \
  | tee "$OUT/tests_cluster.log" | tail -8
rc_new=${PIPESTATUS[0]}
# the fused Hadamard's version 5 (session 10: H_B on the tensor cores), also alone first
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
  -k "quantize_hadamard and -5]" 2>&1 | tee "$OUT/tests_had5.log" | tail -8
rc_had5=${PIPESTATUS[0]}
NCU_CASES="gemm17_gate_up_m64 gemm21_gate_up_m8192"
TESTS="quantize or compile or deterministic or gemm"
if [ "$rc_new" != 0 ]; then  # keep the new kinds out of the other tests, the benchmarks and the profiles
  export OSTQUANT_BENCH_SKIP_KINDS=17,18,19,20,21
  NCU_CASES="gemm13_gate_up_m64 gemm5_gate_up_m8192"
  TESTS="quantize or compile or deterministic or (gemm and not (-17] or -18] or -19] or -20] or -21]))"
fi
[ "$rc_had5" != 0 ] && TESTS="($TESTS) and not (quantize_hadamard and -5-)"
SKIP_BENCH=1 TESTS="$TESTS" bash tests/gpu/run_kernels.sh 2>&1 | tail -12
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py 2>&1 \
  | tee "$OUT/tests_kv4.log" | tail -6
timeout 200 python3 benchmarks/kernels.py --models llama3-8b --ms 16,24,32,48,64,96,128 --skip-quant --quick \
  --out "$OUT/kernels_midm.json" 2>&1 | grep -E "M= *(24|64|128) .*(w4a4 |wg1[3-6]|ws|fp8)|failed" | tail -60
timeout 90 python3 benchmarks/kernels.py --models llama3-8b --skip-quant --ms 2048,8192 \
  --out "$OUT/kernels_large_m.json" 2>&1 | grep -E "(w4a4 |wg5|ws21|fp8|bf16) |failed" | tail -40
[ "$rc_had5" = 0 ] && timeout 90 python3 benchmarks/kernels.py --models "" --hadamard-only \
  --out "$OUT/kernels_hadamard.json" 2>&1 | grep -E "K=14336 had=1 .*M= *(16|2048|8192)|failed" | tail -30
timeout 150 bash benchmarks/gpu_ncu.sh $NCU_CASES kv4_b1_ctx4096 2>&1 | tail -60
