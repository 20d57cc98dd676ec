#!/usr/bin/env bash
# Device calls, back to back on one warm machine, each under the 600 s limit. The first carries
# ostquant_vllm/kernels/_build (later calls find it there); the vLLM bundle's 4 calls (../shared/gpu, each
# carrying one chunk) go between PART=kern and PART=e2e. Session 15 ran PART=kern (then for kinds 35/36)
# and PART=e2e (as run_session15.sh); session 16: PART=kern (kinds 37-39), the bundle's 4 calls, PART=e2e
# with the winners in E2E_ENV (OSTQUANT_KIND_MAP), PART=profile.
#   PART=kern  the GPU kernel tests of kinds 35-39 and the dispatch, the 8B GEMM rows at 16 and 64 tokens
#              (kinds 35/36 "dec8w_r6t32" / "dec_r6t32": 6 weight blocks a warp; 37 "dec16w_r4t32": kind 11
#              with 16 warps a CTA; 38/39 "dec8w_r6t16" / "dec8w_r4t16": 35/31 with 16 tokens a CTA; beside
#              kinds 11 and 31), then Nsight Compute on the batch-64 qkv and down GEMMs
#              (benchmarks/gpu_ncu.sh; $OUT/ncu_*.txt)
#   PART=e2e   two kernel tests (the library loads and runs), then benchmarks/e2e_vllm.py: bf16, FP8 and
#              ostquant W4A4KV4 with the defaults, or under the settings in $E2E_ENV (/tmp/e2e_vllm.json)
#   PART=profile  the batch-64 decode step of ostquant W4A4KV4 by kernel (into /tmp/e2e_vllm.json's profiles);
#              PROFILE_BATCH=256 PROFILE_CONFIGS=ostquant_w4a4kv4,fp8 E2E_TIMEOUT=400: where batch 256 loses to FP8
#              (the prefill's share: the "prefill_gpu_ms" of each)
#   PART=tuned ostquant W4A4KV4 again under the settings in $E2E_ENV into $OUT/e2e_vllm_$TAG.json, e.g.
#              E2E_ENV="OSTQUANT_KIND_MAP=35:38" TAG=t1 PART=tuned bash tests/gpu/run_session16.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-kern}" in
kern)
  . tests/gpu/env.sh
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
  # the new kinds at every M and shape, and the dispatch's shapes (the rest of csrc is unchanged since
  # session 14, whose call passed all 257)
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
    -k "35 or 36 or 37 or 38 or 39 or shapes or public_api or deterministic" 2>&1 | tee "$OUT/tests_kernels.log" | tail -4
  OSTQUANT_BENCH_SKIP_KINDS=3,5,9,10,12,13,14,15,16,22,23,24,25,29,30,32,33,34 timeout 200 \
    python3 benchmarks/kernels.py --models llama3-8b --ms 16,64 --skip-quant --out "$OUT/kernels_r6.json" 2>&1 \
    | grep -E "ostquant_w4a4 |r4t32|r6t32|t16|failed" | tail -40
  timeout 150 bash benchmarks/gpu_ncu.sh gemm37_down_m64 gemm38_qkv_m64 2>&1 | tail -40
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
