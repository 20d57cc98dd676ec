#!/usr/bin/env bash
# Session 12's device calls, back to back on the warm machine, each under the 600 s limit. The first
# carries ostquant_vllm/kernels/_build (later ones find it there); the vLLM bundle's 4 calls
# (../shared/gpu, each carrying one chunk) come between PART=ours and the parts that need vLLM:
#   PART=ours  the KV4 kernel tests (the split combine now in the decode kernel's last CTA; two tiles in
#              flight a warp), then our decode alone (no vLLM): the default, the least split at 4 tiles,
#              and OSTQUANT_KV4_PREFETCH=2 (SHORT=1: not the least split at 4)
#   PART=pdl   OSTQUANT_PDL=1 (decode GEMMs as programmatic dependents of the quantize kernels): its test,
#              then the 8B quantize + GEMM chains at 1, 16, 64 tokens with it off and on
#   PART=kv4   benchmarks/kv4_attention.py against vLLM's int4 path, FA3 bf16 and FA3 FP8
#   PART=e2e1  benchmarks/e2e_vllm.py: bf16, FP8, ostquant W4A4KV4 and ostquant W4A4 + FP8 KV (issue 7's
#              same-weights baseline)
#   PART=e2e2  W4A16 and ostquant W4A8KV4, then the batch-64 profile of ostquant W4A4KV4
#   PART=e2e3  ostquant W4A4KV4 again with OSTQUANT_PDL=1 (e2e_vllm_pdl.json), to set beside e2e1's row
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-ours}" in
ours)
  . tests/gpu/env.sh
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py 2>&1 \
    | tee "$OUT/tests_kv4.log" | tail -4
  timeout 70 python3 -m benchmarks.kv4_attention --ours-only --out "$OUT/kv4_attention_ours.json" 2>&1 | tail -13
  [ "${SHORT:-0}" = 1 ] || OSTQUANT_KV4_MIN_TILES=4 timeout 40 python3 -m benchmarks.kv4_attention --ours-only \
    --batches 1,16 --out "$OUT/kv4_attention_ours_min4.json" 2>&1 | tail -7
  OSTQUANT_KV4_PREFETCH=2 timeout 70 python3 -m benchmarks.kv4_attention --ours-only \
    --out "$OUT/kv4_attention_ours_prefetch2.json" 2>&1 | tail -13
  ;;
pdl)  # programmatic dependent launch of the decode GEMMs after the quantize kernels: tests, then the
  # quantize + GEMM chains in CUDA graphs (the ostquant_w4a4_linear rows) with it off and on
  . tests/gpu/env.sh
  timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py -k "pdl or graph" \
    2>&1 | tail -3
  for p in 0 1; do
    OSTQUANT_PDL=$p timeout 120 python3 benchmarks/kernels.py --models llama3-8b --ms 1,16,64 --skip-quant --quick \
      --out "$OUT/kernels_pdl$p.json" 2>&1 | grep -E "w4a4_linear|failed" | tail -12
  done
  ;;
kv4)
  SKIP_TESTS=1 KV4_BENCH_TIMEOUT=400 bash benchmarks/gpu_kv4.sh
  ;;
e2e1)
  E2E_TIMEOUT=570 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4,ostquant_w4a4_fp8kv,bf16,fp8 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -40
  ;;
e2e2)
  E2E_TIMEOUT=400 bash benchmarks/gpu_e2e.sh --configs w4a16,ostquant_w4a8kv4 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  E2E_TIMEOUT=160 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 --profile --batches 64 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  ;;
e2e3)
  OSTQUANT_PDL=1 E2E_TIMEOUT=300 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 --out /tmp/e2e_vllm_pdl.json \
    2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -12
  cp /tmp/e2e_vllm_pdl.json "$OUT/" 2>/dev/null
  ;;
esac
