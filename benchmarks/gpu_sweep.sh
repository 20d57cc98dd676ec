#!/usr/bin/env bash
# Accuracy experiments side by side on one GPU. A 135M model keeps an H100 only partly busy: two
# full-recipe OSTQuant runs at once took 230-320 s each on an H100, one alone 244 s; three (at 1 window a
# forward) 537 s. Memory: about 30 GB a run at 2 windows a forward, 18 GB at 1 (--train-micro-batch 1). Each run starts from the committed table's rows
# (--resume; float and baselines are not re-run) and writes $OUT/NAME.json and $OUT/NAME.tgz (NAME.log and
# the training state, NAME/METHOD_SETTING/train_state.pt, saved every 10 steps).
#   after `bash benchmarks/gpu_accuracy.sh receive` (carry .gpu-carry1), carry .gpu-carry2 and run
#   bash benchmarks/gpu_sweep.sh "NAME1 ARGS1..." "NAME2 ARGS2..." ...
#   e.g. "lrrot3 --settings w4a4kv4 --methods ostquant --redo ostquant:w4a4kv4 --lr-rot 0.05"
# A run longer than one call continues in the next: put the NAME.tgz files that came back in .gpu-carry-state/,
# carry it (with .gpu-carry2 if the machine is new) and repeat the same command; training resumes at its last
# saved step (a row's "seconds" then counts only the last call).
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
    mkdir -p /tmp/ostq-work
    if [ -f ".gpu-carry-state/$name.tgz" ] && [ ! -d "/tmp/ostq-work/$name" ]; then
        tar -xzf ".gpu-carry-state/$name.tgz" -C /tmp/ostq-work "$name"
    fi
    # shellcheck disable=SC2086
    timeout "${SWEEP_TIMEOUT:-570}" python3 -m benchmarks.accuracy --recipe full --resume --out "$OUT/$name.json" \
        --work-dir "/tmp/ostq-work/$name" $args >> "/tmp/ostq-work/$name.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
kill $monitor
for spec in "$@"; do
    read -r name _ <<< "$spec"
    echo "== $name"; tr '\r' '\n' < "/tmp/ostq-work/$name.log" | grep -E "train transforms|row ostquant|row quarot|Error|error" | tail -3
    tar -czf "$OUT/$name.tgz" -C /tmp/ostq-work "$name" "$name.log"
done
