#!/usr/bin/env bash
# vLLM 0.26 on the GPU machine with the plugin installed as a package (its entry point registers
# `ostquant`), our kernels carried prebuilt (ostquant_vllm/kernels/_build), the default model already
# unpacked by benchmarks/gpu_accuracy.sh in /tmp/ostq-cache.
set -uo pipefail
. /tmp/vllm-bundle/env.sh
export OSTQUANT_CACHE=/tmp/ostq-cache PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ostq-site . 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site:/tmp/ostq-site:$PYTHONPATH
python3 -c "from importlib.metadata import entry_points as e; print([x.value for x in e(group='vllm.general_plugins')])"
python3 tests/gpu/vllm_gpu.py "$@"
