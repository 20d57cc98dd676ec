#!/usr/bin/env bash
# Device calls, back to back on one warm machine, each under the 600 s limit. The first carries
# ostquant_vllm/kernels/_build (later calls find it there); the vLLM bundle's 4 calls (../shared/gpu, each
# carrying one chunk) go between PART=kern and the vLLM parts. Session 17 ran PART=kern, the bundle's 4 calls,
# PART=vllmk (both models), PART=profile with PROFILE_BATCH=256 PROFILE_CONFIGS=ostquant_w4a4kv4,fp8, then PART=e2e.
# Session 19 ran PART=verify (in commit bbce8f0, removed since: PART=kern's tests with kinds 37 and 40 in processes
# of their own, PART=largem's rows, the loaders' A/B against a library built with session 16's loaders), the
# bundle's 4 calls, PART=e2e with E2E_ENV="OSTQUANT_KIND_MAP=5:40,12:40,6:40,26:40", PART=tuned (TAG=base,
# E2E_ENV=OSTQUANT_PDL=0: the dispatch of the time), PART=profile, PART=tuned (k40, base2).
# Session 20 ran (library of commit 5a41287) TESTS_K="gemm or cutlass" SKIP_NCU=1 SKIP_PROBE=1 PART=kern, then
# SCHED_MODELS=llama3-8b SKIP_NCU=1 PART=sched in the same call, the bundle's 4 calls, PART=e2e with
# E2E_ENV="OSTQUANT_KIND_MAP=$(python3 benchmarks/pick_kinds.py /tmp/kernels_dispatch.json) OSTQUANT_CUTLASS_RASTER=2
# OSTQUANT_CUTLASS_SWIZZLE=4 OSTQUANT_CUTLASS_TILE=1" (what the dispatch now does by itself), SCHED_MODELS=llama3-70b
# PART=sched + PART=tuned TAG=maponly (the map alone), PART=profile, PART=tuned TAG=no40 (kinds 6 / 26 for kind 40).
# Session 21 ran SKIP_NCU=1 SKIP_PROBE=1 SKIP_DISPATCH=1 PART=kern, the bundle, PART=prefillab; on a second machine the
# bundle, a timed prefill A/B (gpu_e2e.sh --configs ostquant_w4a4kv4 --batches 256 --output-len 2 --repeats 2
# --prefill-repeats 6, with and without OSTQUANT_KIND_MAP=40@4096x14336:26,40:6), tests/gpu/run_hadamard.sh (a library
# with a variant 7, since removed) and Nsight Compute on the fused Hadamard (gpu_ncu.sh had1v5_m8192_k14336). A third
# machine (quantize tests, the bundle, PART=e2e E2E_ARGS="--batches 64") never started.
# Session 22 ran HAD_MS=1,64,256,2048,8192 bash tests/gpu/run_hadamard.sh, PART=pdl then PART=kv4pf in one call, the
# bundle, AB_ENVS="-;OSTQUANT_PDL=1 OSTQUANT_KV4_PREFETCH=2;-;OSTQUANT_PDL=1 OSTQUANT_KV4_PREFETCH=2" PART=ab, then
# benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4,fp8,bf16 --batches 64 --prefill-repeats 3 and PART=profile, both with
# OSTQUANT_HAD_VARIANT=8 OSTQUANT_PDL=1 OSTQUANT_KV4_PREFETCH=2 (version 6 and two KV tiles are the defaults since).
# Session 23 ran PART=pdl, KV4PF_CONTEXTS=256,4096,16384 PART=kv4pf, the bundle, AB_BATCHES=64 PART=ab twice (AB_ENVS in
# results/e2e_vllm_h100_b64_session23.json), then benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4,fp8 and --configs bf16
# at --batches 64 --prefill-repeats 2 (OSTQUANT_PDL and OSTQUANT_EPI_PREFETCH are the defaults since).
# Session 24 ran PART=fuse, the bundle, AB_ENVS="OSTQUANT_FUSE_NORM=1;-;OSTQUANT_FUSE_NORM=1" AB_TIMEOUT_FIRST=220
# AB_TIMEOUT=140 PART=ab, then OSTQUANT_FUSE_NORM=1 benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4,fp8,bf16 --batches 64
# --prefill-repeats 2 (the norm fusion is the default since).
# Next: the bundle, PROFILE_BATCH=1 PROFILE_ARGS="--input-len 2048" PART=profile (ours' 2048-token prefill: 35 ms in
# session 23, 58-72 ms in session 24), PART=e2e (every batch under the new defaults), then AB_ENVS="-;
# OSTQUANT_KV4_PREFETCH=1;-;OSTQUANT_KV4_PREFETCH=1" PART=ab.
#   PART=kern  every GPU kernel test (tests/gpu/test_kernels.py, test_kv4_kernels.py; TESTS_K: pytest's -k), the
#              dispatch's GEMM rows at 1, 16, 64 and 256 tokens on the 8B and 70B layers ($OUT/kernels_dispatch.json:
#              compare with the ostquant rows of results/kernels_h100_vllm.json; a copy in /tmp), the int8 mma.sync rate
#              (benchmarks/mma_probe.py -> $OUT/mma_probe.json; SKIP_PROBE=1 leaves it out), then Nsight Compute
#              with the sections' bodies on the batch-64 down GEMM (benchmarks/gpu_ncu.sh; $OUT/ncu_*.txt;
#              SKIP_NCU=1 leaves it out)
#   PART=largem the 8B and 70B GEMM rows at 256, 2048 and 8192 tokens with the wgmma alternates (kinds 3, 5, 6, 26
#              and 40, CUTLASS's mainloop on our layout; $OUT/kernels_largem.json)
#   PART=vllmk the mixed-batch KV4 tests with vLLM's FlashAttention, then benchmarks/kernels.py --vllm: ours
#              against torch bf16 / fp8 / int8 and vLLM's CUTLASS W8A8-int8, Machete W4A16 and CUTLASS W4A8
#              on $VLLMK_MODELS (default llama3-8b) at $VLLMK_MS tokens ($OUT/kernels_vllm_<models>.json)
#   PART=e2e   two kernel tests (the library loads and runs), then benchmarks/e2e_vllm.py: bf16, FP8 and
#              ostquant W4A4KV4 with the defaults, or under the settings in $E2E_ENV (/tmp/e2e_vllm.json); E2E_ARGS
#              more e2e_vllm.py flags (session 21: E2E_ARGS="--batches 64", the bar's batch alone)
#   PART=profile  GPU time by kernel of ostquant W4A4KV4 at batch $PROFILE_BATCH (default 64): the decode
#              steps and the prefill apart (into /tmp/e2e_vllm.json's profiles); PROFILE_CONFIGS adds others,
#              PROFILE_ARGS more e2e_vllm.py flags (the single 2048-token prefill: PROFILE_BATCH=1
#              PROFILE_ARGS="--input-len 2048", with and without E2E_ENV="OSTQUANT_KIND_MAP=40:6")
#   PART=prefillab  PART=profile of the single 2048-token prefill with kind 40 and with kinds 6 / 26 in its place, in one
#              call ($OUT/e2e_prefill_{k40,no40}.json); SKIP_DISPATCH=1 leaves PART=kern's dispatch rows out
#   PART=tuned ostquant W4A4KV4 again under the settings in $E2E_ENV into $OUT/e2e_vllm_$TAG.json, e.g.
#              E2E_ENV="OSTQUANT_KIND_MAP=35:11" TAG=t1 PART=tuned bash tests/gpu/run_session17.sh (E2E_ARGS as above)
#   PART=ab    ostquant W4A4KV4 alone at batch(es) $AB_BATCHES (default 64) under each setting of $AB_ENVS in turn
#              (';'-separated, '-' for none), e.g. AB_ENVS="-;OSTQUANT_PDL=1;-;OSTQUANT_PDL=1" ($OUT/e2e_ab<i>.json;
#              AB_TIMEOUT a run, default 150 s, the first AB_TIMEOUT_FIRST, default 240 s: it pays torch.compile's cold
#              cache, and session 22's first run at 125 s timed out)
#   PART=kv4pf the KV4 decode tests, then our KV4 decode alone with one tile in flight a warp (registers) and with two
#              (OSTQUANT_KV4_PREFETCH=2: shared memory), twice in turn ($OUT/kv4_pf{1,2}{a,b}.json; contexts
#              KV4PF_CONTEXTS, default 256,4096)
#   PART=pdl   the decode GEMMs as programmatic dependents of the quantize kernels (OSTQUANT_PDL=1) and with their
#              epilogue operands copied first (OSTQUANT_EPI_PREFETCH=1): their tests, then the 8B quantize + GEMM
#              chains at 1, 16 and 64 tokens in CUDA graphs under none, PDL, the prefetch, both, twice in turn
#              ($OUT/kernels_chain{0,1,2,3}{a,b}.json)
#   PART=fuse  the fused quantizers' GPU tests (and the plain / Hadamard ones'), then benchmarks/fusion_bench.py
#              ($OUT/fusion_bench.json)
#   PART=sched kind 40's settings test, then kind 40 at 2048 and 8192 tokens on the 8B and 70B layers under each
#              tile order of CUTLASS's scheduler and each tile shape (benchmarks/cutlass_sched.py, one process;
#              $OUT/kernels_sched.json), then Nsight Compute on kind 40 (8B o at 2048 and 8192 tokens, gate_up at
#              8192; SKIP_NCU=1 leaves it out)
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/ostq_out}; mkdir -p "$OUT"
case "${PART:-kern}" in
kern)
  . tests/gpu/env.sh
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
  timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short -rf ${TESTS_K:+-k "$TESTS_K"} \
    tests/gpu/test_kernels.py tests/gpu/test_kv4_kernels.py 2>&1 | tee "$OUT/tests_kernels.log" | tail -4
  if [ -z "${SKIP_DISPATCH:-}" ]; then
    OSTQUANT_BENCH_SKIP_KINDS=$(seq -s, 0 36) timeout 240 python3 benchmarks/kernels.py --skip-quant --ms 1,16,64,256 \
      --out "$OUT/kernels_dispatch.json" 2>&1 | grep -E "ostquant_w4a4 |cutlass|failed" | tail -60
    cp "$OUT/kernels_dispatch.json" /tmp/  # for benchmarks/pick_kinds.py in a later call
  fi
  [ -n "${SKIP_PROBE:-}" ] || timeout 120 python3 benchmarks/mma_probe.py --out "$OUT/mma_probe.json" 2>&1 | tail -20
  [ -n "${SKIP_NCU:-}" ] || NCU_DETAILS=1 timeout 200 bash benchmarks/gpu_ncu.sh gemm31_down_m64 2>&1 | tail -20
  ;;
sched)
  . tests/gpu/env.sh
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py -k cutlass_settings \
    2>&1 | tail -2
  timeout 300 python3 benchmarks/cutlass_sched.py --models "${SCHED_MODELS:-llama3-8b,llama3-70b}" \
    --out "$OUT/kernels_sched.json" 2>&1 | tail -200
  [ -n "${SKIP_NCU:-}" ] || NCU_DETAILS=1 timeout 220 bash benchmarks/gpu_ncu.sh gemm40_o_m2048 gemm40_o_m8192 \
    gemm40_gate_up_m8192 2>&1 | tail -40
  ;;
largem)
  . tests/gpu/env.sh
  OSTQUANT_BENCH_SKIP_KINDS=$(seq -s, 7 25),$(seq -s, 27 36) timeout 560 python3 benchmarks/kernels.py --skip-quant --ms 256,2048,8192 \
    --out "$OUT/kernels_largem.json" 2>&1 | grep -E "ostquant_w4a4 |wg6|wp26|cutlass40|torch_fp8|failed" | tail -60
  ;;
vllmk)
  . benchmarks/gpu_vllm_env.sh || exit 1
  . tests/gpu/env.sh
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py -k mixed 2>&1 | tail -3
  OSTQUANT_BENCH_SKIP_KINDS=$(seq -s, 0 36) timeout 500 python3 benchmarks/kernels.py --vllm --skip-quant \
    --models "${VLLMK_MODELS:-llama3-8b}" --ms "${VLLMK_MS:-1,16,64,256,2048,8192}" \
    --out "$OUT/kernels_vllm_${VLLMK_MODELS:-llama3-8b}.json" 2>&1 | grep -E "vllm|failed|wrote|copy" | tail -40
  ;;
e2e)
  . tests/gpu/env.sh
  timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
    -k "public_api or deterministic" 2>&1 | tail -2
  env ${E2E_ENV:-} E2E_TIMEOUT=${E2E_TIMEOUT:-400} bash benchmarks/gpu_e2e.sh --configs bf16,fp8,ostquant_w4a4kv4 ${E2E_ARGS:-} 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -20
  ;;
profile)
  env ${E2E_ENV:-} E2E_TIMEOUT=${E2E_TIMEOUT:-160} bash benchmarks/gpu_e2e.sh --configs ${PROFILE_CONFIGS:-ostquant_w4a4kv4} --profile \
    --batches "${PROFILE_BATCH:-64}" ${PROFILE_ARGS:-} 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30
  ;;
prefillab)
  # the single 2048-token prefill profiled with kind 40 (the dispatch) and with kinds 6 / 26 in its place
  for tag in k40 no40; do
    map=""; [ "$tag" = no40 ] && map="OSTQUANT_KIND_MAP=40@4096x14336:26,40:6"
    env $map E2E_TIMEOUT=270 bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 --profile --batches 1 \
      --input-len 2048 --out "/tmp/e2e_prefill_$tag.json" 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -6
    cp "/tmp/e2e_prefill_$tag.json" "$OUT/" 2>/dev/null
    python3 - "$OUT/e2e_prefill_$tag.json" <<'PY'
import json, sys
p = next(iter(json.load(open(sys.argv[1]))["profiles"].values()))["profile"]
print(sys.argv[1], "prefill wall", round(p["prefill_wall_ms"], 1), "gpu", round(p["prefill_gpu_ms"], 1))
for k, t in p["top_prefill_kernels_ms"][:8]:
    print(f"  {t:8.2f} ms  {k[:100]}")
PY
  done
  ;;
ab)
  IFS=';' read -ra envs <<< "${AB_ENVS:?set AB_ENVS}"
  i=0
  for e in "${envs[@]}"; do
    i=$((i + 1)); [ "$e" = - ] && e=""
    rm -f "/tmp/e2e_ab$i.json"
    t=${AB_TIMEOUT:-150}; [ $i = 1 ] && t=${AB_TIMEOUT_FIRST:-240}
    env $e E2E_TIMEOUT=$t bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 \
      --batches "${AB_BATCHES:-64}" --prefill-repeats 2 --out "/tmp/e2e_ab$i.json" 2>&1 \
      | grep -v "^WARNING\|^(EngineCore" | grep -E "\[e2e\]|rror|ostquant: fused" | tail -4 | sed "s/^/[$i ${e:-base}] /"
    cp "/tmp/e2e_ab$i.json" "$OUT/" 2>/dev/null
    python3 - "/tmp/e2e_ab$i.json" "$i" <<'PY' 2>/dev/null  # the warm-up's greedy tokens: equal across settings?
import hashlib, json, sys
def find(o):
    if isinstance(o, dict):
        if "warmup_tokens" in o:
            return o["warmup_tokens"]
        o = list(o.values())
    for v in o if isinstance(o, list) else []:
        if (r := find(v)) is not None:
            return r
t = find(json.load(open(sys.argv[1])))
print(f"[{sys.argv[2]}] warm-up tokens", hashlib.sha1(json.dumps(t).encode()).hexdigest()[:12], (t or [[]])[0][:8])
PY
  done
  ;;
kv4pf)
  . tests/gpu/env.sh
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kv4_kernels.py \
    -k "decode or split or pdl" 2>&1 | tee "$OUT/tests_kv4pf.log" | tail -2
  for run in a b; do
    for pf in 1 2; do
      OSTQUANT_KV4_PREFETCH=$pf timeout 100 python3 -m benchmarks.kv4_attention --ours-only --no-check \
        --contexts "${KV4PF_CONTEXTS:-256,4096}" --out "$OUT/kv4_pf$pf$run.json" 2>&1 | grep -E "^ *[0-9]+ +[0-9]+ |rror" \
        | tail -16 | sed "s/^/pf=$pf$run /"
    done
  done
  ;;
pdl)
  . tests/gpu/env.sh
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
    -k "pdl or graph or epilogue" 2>&1 | tee "$OUT/tests_pdl.log" | tail -2
  # settings i = 0..3: none, PDL, the epilogue's operands first, both
  settings=("OSTQUANT_PDL=0 OSTQUANT_EPI_PREFETCH=0" "OSTQUANT_PDL=1 OSTQUANT_EPI_PREFETCH=0"
            "OSTQUANT_PDL=0 OSTQUANT_EPI_PREFETCH=1" "OSTQUANT_PDL=1 OSTQUANT_EPI_PREFETCH=1")
  for run in a b; do
    for i in 0 1 2 3; do
      env ${settings[$i]} timeout 100 python3 benchmarks/kernels.py --models llama3-8b --ms 1,16,64 --skip-quant \
        --quick --out "$OUT/kernels_chain$i$run.json" 2>&1 | grep -E "w4a4_linear|failed" | tail -12 | sed "s/^/s$i$run /"
    done
  done
  ;;
fuse)
  # session 24: the fused quantizers of ostquant_vllm/fusion.py (RMSNorm + quantize, SiluAndMul + Hadamard quantize),
  # their tests and the untouched quantizers', then the chains against the two kernels they replace
  . tests/gpu/env.sh
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_kernels.py \
    -k "rms_norm or silu_mul or quantize_plain or public_api or torch_compile or hadamard_blocks" 2>&1 \
    | tee "$OUT/tests_fuse.log" | tail -4
  timeout 150 python3 benchmarks/fusion_bench.py --out "$OUT/fusion_bench.json" 2>&1 | grep -E "us$|rror" | tail -40
  ;;
tuned)
  env ${E2E_ENV:?set E2E_ENV} E2E_TIMEOUT=${E2E_TIMEOUT:-300} bash benchmarks/gpu_e2e.sh --configs ostquant_w4a4kv4 ${E2E_ARGS:-} \
    --out "/tmp/e2e_vllm_${TAG:?set TAG}.json" 2>&1 \
    | grep -v "^WARNING\|^INFO\|^(EngineCore" | grep -E "\[e2e\]|rror" | tail -8
  cp "/tmp/e2e_vllm_$TAG.json" "$OUT/" 2>/dev/null
  ;;
esac
