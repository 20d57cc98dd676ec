#!/usr/bin/env bash
# One device call (session 9): the wgmma GEMMs with 64- and 32-token tiles and cluster split-K (kinds
# 13-16) first in their own process (a hang or fault cannot take the rest down), then the GPU tests
# (run_kernels.sh: quantize, compile, deterministic, gemm), then the 16-128-token GEMM rows of every
# kind. The session's first call also ran `benchmarks/kernels.py --models ""` (plain and
# --hadamard-only) and `--skip-quant --ms 2048,8192`.
# Carry ostquant_vllm/kernels/_build.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site ostquant_vllm/kernels/_build/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; }
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
  -k "each_kernel and (-13] or -14] or -15] or -16])" 2>&1 | tee "$OUT/tests_cluster.log" | tail -8
SKIP_BENCH=1 TESTS="quantize or compile or deterministic or gemm" bash tests/gpu/run_kernels.sh 2>&1 | tail -30
B="python3 benchmarks/kernels.py"
timeout 150 $B --models llama3-8b --ms 16,24,32,48,64,96,128 --skip-quant --quick --out "$OUT/kernels_midm.json" \
  2>&1 | grep -E "M= *(24|32|48|64|96|128) .*(w4a4 |wg1[3-6]|wg5|fp8)|failed" | tail -70
