#!/usr/bin/env bash
# One device call (session 8): the activation quantize kernels (plain; fused Hadamard versions 3/4 and
# the automatic choice) and the wgmma GEMMs: GPU tests (run_kernels.sh), then benchmarks (quantize rows,
# fused-Hadamard rows, large-M GEMM rows). Carry ostquant_vllm/kernels/_build.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
SKIP_BENCH=1 TESTS="quantize or compile or deterministic or gemm" bash tests/gpu/run_kernels.sh
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 60 python3 benchmarks/kernels.py --models "" --out "$OUT/kernels_quant.json" 2>&1 | grep -v "^$" | tail -30
timeout 60 python3 benchmarks/kernels.py --models "" --hadamard-only --out "$OUT/kernels_hadamard.json" 2>&1 | tail -5
timeout 150 python3 benchmarks/kernels.py --skip-quant --ms 2048,8192 --out "$OUT/kernels_large_m.json" 2>&1 | tail -3
