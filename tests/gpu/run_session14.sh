#!/usr/bin/env bash
# Session 14's device calls (session 13's experiments, which it built but could not measure), back to
# back on one warm machine, each under the 600 s limit. The first carries
# ostquant_vllm/kernels/_build (later calls find it there); the vLLM bundle's 4 calls (../shared/gpu, each
# carrying one chunk) go between PART=kern and PART=e2e. Session 14 ran PART=kern, e2e and tuned before the
# dispatch took the 8-warp kinds and version 5; what is left for the next session: the bundle's 4 calls,
# then PART=e2e (carry _build), then PART=profile.
#   PART=kern  every GPU kernel test (decode kinds 27-34 and Hadamard variant 6 included), then the
#              8B GEMM rows at 1, 16 and 64 tokens (the dec8w and _cl2 rows beside kinds 7-12) and the fused Hadamard rows
#              (variant 6, "_v4r1", beside the others; M = 64 is batch-64 decode)
#   PART=e2e   the kernel tests again (quick), then benchmarks/e2e_vllm.py: bf16, FP8 and ostquant W4A4KV4
#              with the defaults (/tmp/e2e_vllm.json)
#   PART=profile  the batch-64 decode step of ostquant W4A4KV4 by kernel (into /tmp/e2e_vllm.json's profiles)
#   PART=tuned ostquant W4A4KV4 again under the settings in $E2E_ENV into $OUT/e2e_vllm_$TAG.json, e.g.
#              E2E_ENV="OSTQUANT_HAD_VARIANT=4" TAG=t1 PART=tuned bash tests/gpu/run_session14.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-kern}" in
kern)
  . tests/gpu/env.sh
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
  timeout 170 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py 2>&1 \
    | tee "$OUT/tests_kernels.log" | tail -6
  timeout 200 python3 benchmarks/kernels.py --models llama3-8b --ms 1,16,64 --skip-quant \
    --out "$OUT/kernels_dec8w.json" 2>&1 | grep -E "ostquant_w4a4 |dec|failed" | tail -60
  timeout 200 python3 benchmarks/kernels.py --models "" --hadamard-only --out "$OUT/kernels_hadamard.json" 2>&1 \
    | grep -E "had=8 M=   64|had=8 M= 8192|failed" | tail -40
  ;;
e2e)
  . tests/gpu/env.sh
  timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py 2>&1 | tail -3
  E2E_TIMEOUT=400 bash benchmarks/gpu_e2e.sh --configs bf16,fp8,ostquant_w4a4kv4 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -20
  ;;
profile)
  E2E_TIMEOUT=160 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 --profile --batches 64 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  ;;
tuned)
  env ${E2E_ENV:?set E2E_ENV} E2E_TIMEOUT=${E2E_TIMEOUT:-300} bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 \
    --out "/tmp/e2e_vllm_${TAG:?set TAG}.json" 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -8
  cp "/tmp/e2e_vllm_$TAG.json" "$OUT/" 2>/dev/null
  ;;
esac
