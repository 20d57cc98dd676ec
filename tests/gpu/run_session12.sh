#!/usr/bin/env bash
# Session 12's device calls, after the 4 calls of ../shared/gpu that install vLLM 0.26 (each carrying
# one chunk). Each part is one call under the 600 s limit, back to back on the warm machine; the first
# carries ostquant_vllm/kernels/_build, later ones find it there:
#   PART=kv4   the KV4 kernel tests (the split combine now in the decode kernel's last CTA), then
#              benchmarks/kv4_attention.py against vLLM's int4 path, FA3 bf16 and FA3 FP8, then our
#              decode alone at batch 1 and 16 with the least split at 4 and 8 tiles (default 16)
#   PART=e2e1  benchmarks/e2e_vllm.py: bf16, FP8, ostquant W4A4KV4 and ostquant W4A4 + FP8 KV (issue 7's
#              same-weights baseline)
#   PART=e2e2  W4A16 and ostquant W4A8KV4, then the batch-64 profile of ostquant W4A4KV4
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-kv4}" in
kv4)
  KV4_BENCH_TIMEOUT=240 bash benchmarks/gpu_kv4.sh
  . /tmp/vllm-bundle/env.sh; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  for t in 4 8; do
    OSTQUANT_KV4_MIN_TILES=$t timeout 60 python3 -m benchmarks.kv4_attention --ours-only --batches 1,16 \
      --out "$OUT/kv4_attention_ours_min$t.json" 2>&1 | grep -v "^WARNING\|^INFO" | tail -7
  done
  ;;
e2e1)
  E2E_TIMEOUT=570 bash benchmarks/gpu_e2e.sh --configs bf16,fp8,ostquant_w4a4kv4,ostquant_w4a4_fp8kv 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -40
  ;;
e2e2)
  E2E_TIMEOUT=400 bash benchmarks/gpu_e2e.sh --configs w4a16,ostquant_w4a8kv4 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  E2E_TIMEOUT=160 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 --profile --batches 64 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  ;;
esac
