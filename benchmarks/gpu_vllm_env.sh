# Sourced (`. benchmarks/gpu_vllm_env.sh`) by the GPU scripts that run vLLM with the plugin, after the
# vLLM bundle reached the machine (../shared/gpu, 4 calls): vLLM's environment, the plugin installed as
# a package from the carried source (its entry point registers `ostquant` in every vLLM process, the
# tensor-parallel workers too; reinstalled each call so it is never a stale copy) and our kernels prebuilt
# in ostquant_vllm/kernels/_build (carried). NVLink multicast stays off at TP > 1 through
# benchmarks/e2e_vllm.py's TP_ENV / TP_PASS_CONFIG, which the Python drivers apply to their engines.
. /tmp/vllm-bundle/env.sh || return 1
export PYTHONUNBUFFERED=1 OSTQUANT_CACHE=/tmp/ostq-cache \
    OSTQUANT_KERNELS_LIB=$PWD/ostquant_vllm/kernels/_build/libostquant_kernels.so
rm -rf /tmp/ostq-site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ostq-site . 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site:/tmp/ostq-site${PYTHONPATH:+:$PYTHONPATH}
