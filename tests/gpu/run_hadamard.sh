#!/usr/bin/env bash
# One device call for the fused Hadamard + quantize kernels (issue 5): every quantize GPU test, then the Hadamard
# benchmark (every version, Llama-3-8B/70B and SmolLM2 down_proj inputs; HAD_MS: its token counts, default all) to
# $OUT/kernels_hadamard.json.
# Carry ostquant_vllm/kernels/_build.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/gpu/env.sh  # $OUT, PYTHONPATH, pytest
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
PT="python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py"
timeout 200 $PT -k "quantize" 2>&1 | tee "$OUT/tests_quantize.log" | tail -6
timeout 330 python3 benchmarks/kernels.py --models "" --hadamard-only ${HAD_MS:+--ms $HAD_MS} \
  --out "$OUT/kernels_hadamard.json" 2>&1 \
  | grep -E "had=(1|8) .*M= *(64|2048|8192)|failed" | tail -60
