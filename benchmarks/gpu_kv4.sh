#!/usr/bin/env bash
# Issue 7 on the lent GPU, one call after the vLLM bundle (../shared/gpu, 4 calls): the kv4 kernel
# tests, then benchmarks/kv4_attention.py (ours vs vLLM's int4 path, FA3 bf16, FA3 fp8) to $OUT.
#   run(command="bash benchmarks/gpu_kv4.sh", carry=["ostquant_vllm/kernels/_build"])
# Env: KV4_BENCH_ARGS (e.g. "--batches 64 --contexts 4096"), SKIP_TESTS=1, SKIP_BENCH=1.
set -uo pipefail
. /tmp/vllm-bundle/env.sh || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short -x tests/gpu/test_kv4_kernels.py 2>&1 \
    | tee "$OUT/tests_kv4.log" | tail -15
  rc=${PIPESTATUS[0]}; echo "pytest rc=$rc"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${KV4_BENCH_TIMEOUT:-300}" python3 -m benchmarks.kv4_attention ${KV4_BENCH_ARGS:-} --out "$OUT/kv4_attention.json" 2>&1 \
    | grep -v "^WARNING\|^INFO" | tee "$OUT/kv4_bench.log" | tail -30
  echo "bench rc=${PIPESTATUS[0]}"
fi
exit $rc
