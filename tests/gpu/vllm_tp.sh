#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2 (or larger): calibrate the default model on the GPU (QuaRot, calibration's
# defaults: H_down in 8 blocks), then tests/gpu/vllm_tp.py: vLLM greedy tokens at TP 1 and TP 2.
#   bash tests/gpu/vllm_tp.sh w4a16kv4 w4a8kv4 w4a4kv4     (VLLM_TP_SKIP_ORIGINAL=1: no TP 1 run of the unwidened checkpoint)
# Needs the vLLM bundle (../shared/gpu, 4 calls) and the default model (benchmarks/gpu_accuracy.sh
# receive + setup); carry ["ostquant_vllm/kernels/_build"]. Writes $OUT/vllm_tp.json.
set -uo pipefail
. benchmarks/gpu_vllm_env.sh || exit 1
# one checkpoint a preset (default w4a4kv4): W4A16 has no activation quantizer, so TP cannot change
# its numerics beyond the float all-reduce; W4A4/W4A8 quantize each rank's slice (tensor_parallel.py)
for PRESET in "${@:-w4a4kv4}"; do
    CKPT=/tmp/ckpt-tp-quarot-$PRESET
    if [ ! -f $CKPT/config.json ]; then
        python3 -c "
from calibrate.pipeline import CalibConfig, calibrate
calibrate(CalibConfig(method='quarot', preset='$PRESET', eval_float=False, qsur=False), out_dir='$CKPT')" \
            > /tmp/calibrate-$PRESET.log 2>&1 || { tail -20 /tmp/calibrate-$PRESET.log; exit 1; }
    fi
    python3 tests/gpu/vllm_tp.py $CKPT "$OUT/vllm_tp.json" || exit 1
done
