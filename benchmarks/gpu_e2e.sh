#!/usr/bin/env bash
# benchmarks/e2e_vllm.py on the lent GPU, after the vLLM bundle is installed there (../shared/gpu,
# 4 calls). Our kernels travel prebuilt: carry ["ostquant_vllm/kernels/_build"]. The plugin is
# installed as a package (vLLM finds `ostquant` through its entry point, in the engine's process
# too). Results accumulate in /tmp/e2e_vllm.json while the machine stays warm (--resume: finished
# configs are skipped, so one config list can be spread over several calls) and come back in $OUT.
#   bash benchmarks/gpu_e2e.sh --configs bf16,fp8            then   --configs w4a16,ostquant_w4a8kv4 ...
set -uo pipefail
. benchmarks/gpu_vllm_env.sh || exit 1
trap 'cp /tmp/e2e_vllm.json "$OUT/" 2>/dev/null || true' EXIT
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
timeout "${E2E_TIMEOUT:-560}" python3 -m benchmarks.e2e_vllm --out /tmp/e2e_vllm.json --resume "$@"
