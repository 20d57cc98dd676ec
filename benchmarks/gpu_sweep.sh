#!/usr/bin/env bash
# Accuracy experiments side by side on one GPU. A 135M model keeps an H100 only partly busy: two
# full-recipe OSTQuant runs at once took 230-320 s each on an H100, one alone 244 s; three (at 1 window a
# forward) 537 s. Memory: about 30 GB a run at 2 windows a forward, 18 GB at 1 (--train-micro-batch 1). Each run starts from the committed table's rows
# (--resume; float and baselines are not re-run) and writes $OUT/NAME.json and $OUT/NAME.log.
#   after `bash benchmarks/gpu_accuracy.sh receive` (carry .gpu-carry1), carry .gpu-carry2 and run
#   bash benchmarks/gpu_sweep.sh "NAME1 ARGS1..." "NAME2 ARGS2..." ...
#   e.g. "lrrot3 --settings w4a4kv4 --methods ostquant --redo ostquant:w4a4kv4 --lr-rot 0.05"
set -uo pipefail
bash benchmarks/gpu_accuracy.sh setup >/dev/null || exit 1
export OSTQUANT_CACHE=/tmp/ostq-cache PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONPATH=/tmp/site:$PWD
BASE=benchmarks/results/accuracy_SmolLM2-135M-Instruct.json
(while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; done) > "$OUT/gpu.log" &
monitor=$! pids=()
for spec in "$@"; do
    read -r name args <<< "$spec"
    cp $BASE "$OUT/$name.json"
    # shellcheck disable=SC2086
    timeout "${SWEEP_TIMEOUT:-570}" python3 -m benchmarks.accuracy --recipe full --resume --out "$OUT/$name.json" \
        $args > "$OUT/$name.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
kill $monitor
for spec in "$@"; do read -r name _ <<< "$spec"; echo "== $name"; grep -E "row ostquant|row quarot|Error|error" "$OUT/$name.log" | tail -3; done
