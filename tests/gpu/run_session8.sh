#!/usr/bin/env bash
# One device call (session 8): the activation quantize kernels (plain; fused Hadamard versions 3/4 and
# the automatic choice) and the wgmma GEMMs: GPU tests, then benchmarks (quantize rows, large-M GEMM rows).
# Carry ostquant_vllm/kernels/_build.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
python3 -c "import pytest" 2>/dev/null || { pip install -q --no-index --no-deps --target /tmp/site \
  ostquant_vllm/kernels/_build/wheels/*.whl; export PYTHONPATH=/tmp/site; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
PT="python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py"
timeout 200 $PT -k "quantize or compile or deterministic or gemm" 2>&1 | tail -25 | tee "$OUT/tests_quant.log"
timeout 60 python3 benchmarks/kernels.py --models "" --out "$OUT/kernels_quant.json" 2>&1 | grep -v "^$" | tail -30
timeout 60 python3 benchmarks/kernels.py --models "" --hadamard-only --out "$OUT/kernels_hadamard.json" 2>&1 | tail -5
timeout 150 python3 benchmarks/kernels.py --skip-quant --ms 2048,8192 --out "$OUT/kernels_large_m.json" 2>&1 | tail -3
