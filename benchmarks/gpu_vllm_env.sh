# Sourced (`. benchmarks/gpu_vllm_env.sh`) by the GPU scripts that run vLLM with the plugin, after the
# vLLM bundle reached the machine (../shared/gpu, 4 calls): vLLM's environment, the plugin installed as
# a package from the carried source (its entry point registers `ostquant` in every vLLM process, the
# tensor-parallel workers too; reinstalled each call so it is never a stale copy), our kernels prebuilt
# in ostquant_vllm/kernels/_build (carried), and NVLink multicast off: the lent machines' rule, which also
# rules out vLLM's FlashInfer all-reduce (its default backend creates multicast objects).
. /tmp/vllm-bundle/env.sh || return 1
export PYTHONUNBUFFERED=1 OSTQUANT_CACHE=/tmp/ostq-cache \
    OSTQUANT_KERNELS_LIB=$PWD/ostquant_vllm/kernels/_build/libostquant_kernels.so \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0 \
    VLLM_ALLREDUCE_USE_FLASHINFER=0 VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
rm -rf /tmp/ostq-site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ostq-site . 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site:/tmp/ostq-site${PYTHONPATH:+:$PYTHONPATH}
