#!/usr/bin/env bash
# vLLM 0.26 on the GPU machine with the plugin installed as a package (its entry point registers
# `ostquant`), our kernels carried prebuilt (ostquant_vllm/kernels/_build), the default model already
# unpacked by benchmarks/gpu_accuracy.sh in /tmp/ostq-cache.
set -uo pipefail
. benchmarks/gpu_vllm_env.sh || exit 1
export VLLM_ENABLE_V1_MULTIPROCESSING=0
python3 -c "from importlib.metadata import entry_points as e; print([x.value for x in e(group='vllm.general_plugins')])"
python3 tests/gpu/vllm_gpu.py "$@"
