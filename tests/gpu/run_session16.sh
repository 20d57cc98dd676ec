#!/usr/bin/env bash
# Device calls, back to back on one warm machine, each under the 600 s limit. The first carries
# ostquant_vllm/kernels/_build (later calls find it there); the vLLM bundle's 4 calls (../shared/gpu, each
# carrying one chunk) go between PART=kern and the vLLM parts. Session 16 ran PART=kern (then kinds 37-39,
# since removed), the bundle and PART=e2e; next: PART=kern, the bundle's 4 calls, then PART=profile with
# PROFILE_BATCH=256 PROFILE_CONFIGS=ostquant_w4a4kv4,fp8 E2E_TIMEOUT=400 (where our prefill loses to FP8's).
#   PART=kern  every GPU kernel test (tests/gpu/test_kernels.py), the 8B GEMM rows at 16 and 64 tokens
#              (the dispatch beside the decode kinds 11, 31, 35, 36), then Nsight Compute on the batch-64
#              down GEMM (benchmarks/gpu_ncu.sh; $OUT/ncu_*.txt; SKIP_NCU=1 leaves it out)
#   PART=e2e   two kernel tests (the library loads and runs), then benchmarks/e2e_vllm.py: bf16, FP8 and
#              ostquant W4A4KV4 with the defaults, or under the settings in $E2E_ENV (/tmp/e2e_vllm.json)
#   PART=profile  GPU time by kernel of ostquant W4A4KV4 at batch $PROFILE_BATCH (default 64): the decode
#              steps and the prefill apart (into /tmp/e2e_vllm.json's profiles); PROFILE_CONFIGS adds others
#   PART=tuned ostquant W4A4KV4 again under the settings in $E2E_ENV into $OUT/e2e_vllm_$TAG.json, e.g.
#              E2E_ENV="OSTQUANT_KIND_MAP=35:11" TAG=t1 PART=tuned bash tests/gpu/run_session16.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-kern}" in
kern)
  . tests/gpu/env.sh
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
  timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py 2>&1 \
    | tee "$OUT/tests_kernels.log" | tail -4
  OSTQUANT_BENCH_SKIP_KINDS=3,5,9,10,12,13,14,15,16,22,23,24,25,29,30,32,33,34 timeout 200 \
    python3 benchmarks/kernels.py --models llama3-8b --ms 16,64 --skip-quant --out "$OUT/kernels_decode.json" 2>&1 \
    | grep -E "ostquant_w4a4 |r4t32|r6t32|failed" | tail -40
  [ -n "${SKIP_NCU:-}" ] || timeout 150 bash benchmarks/gpu_ncu.sh gemm31_down_m64 2>&1 | tail -40
  ;;
e2e)
  . tests/gpu/env.sh
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
    -k "public_api or deterministic" 2>&1 | tail -2
  env ${E2E_ENV:-} E2E_TIMEOUT=400 bash benchmarks/gpu_e2e.sh --configs bf16,fp8,ostquant_w4a4kv4 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -20
  ;;
profile)
  env ${E2E_ENV:-} E2E_TIMEOUT=${E2E_TIMEOUT:-160} bash benchmarks/gpu_e2e.sh --configs ${PROFILE_CONFIGS:-ostquant_w4a4kv4} --profile \
    --batches "${PROFILE_BATCH:-64}" 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  ;;
tuned)
  env ${E2E_ENV:?set E2E_ENV} E2E_TIMEOUT=${E2E_TIMEOUT:-300} bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 \
    --out "/tmp/e2e_vllm_${TAG:?set TAG}.json" 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -8
  cp "/tmp/e2e_vllm_$TAG.json" "$OUT/" 2>/dev/null
  ;;
esac
