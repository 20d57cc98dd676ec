"""vLLM end to end (issue 6): decode throughput, prefill latency and KV-cache room of bf16, FP8
(W8A8 + fp8 KV), W4A16 (vLLM's GPTQ-Marlin/Machete path) and ostquant W4A8KV4 / W4A4KV4, at
Llama-3-8B shapes with random weights (load_format="dummy"), one config after another on one GPU;
or Llama-3-70B shapes over --tp GPUs with vLLM's tensor parallelism (issue 8).

    python -m benchmarks.e2e_vllm --out benchmarks/results/e2e_vllm_h100.json
    python -m benchmarks.e2e_vllm --shape llama3-70b --tp 2 --configs bf16,fp8,ostquant_w4a4kv4 --out ...
    python -m benchmarks.e2e_vllm --configs bf16,ostquant_w4a4kv4 --profile --resume --out ...  # where the
        # decode step goes: adds "profiles" to --out, measures nothing else

Timing is vLLM's own throughput / latency benchmarks' (`vllm bench throughput|latency`): a timed
`LLM.generate` over fixed-length random-token prompts with `ignore_eos`, output tokens / wall s.
It runs in-process for every batch size of a config (one engine start a config, not one a
measurement): decode = batch B of 128-token prompts, 256 generated tokens each (the prefill of the
B prompts is inside the time, as in `vllm bench throughput`); prefill = one 2048-token prompt,
1 output token, median of --prefill-repeats (10), prefix caching off (so a repeat is a real
prefill). Beside each decode run, a 1-token run of the same batch: "decode_steps_tok_s" =
B * (output - 1) / (the run's median s - the 1-token run's), the decode steps without the prompts'
prefill (the bar reads decode_tok_s).
Every config runs in its own process (a clean GPU), with the same memory share, so "KV-cache
tokens" (vLLM's own count, from its log) compare the room each leaves. The parent merges rows into
--out after every config: a later call with --resume skips finished configs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

# Llama-3-8B (the reference shapes) and a tiny Llama for the CPU smoke test.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=4096, max_position_embeddings=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# A GPTQ-format config (sym, no act-order, group 128): vLLM 0.26 serves it with its AutoGPTQ
# method on its mixed-precision kernel choice (Machete/Marlin). `modules_in_block_to_quantize` is
# required here: without it vLLM reads the list of quantized layers from the safetensors files,
# and a dummy-weight folder has none, so every layer silently stays bf16 (the issue's "GPTQ ran at
# bf16 speed"). The log line "Using <Kernel> for ...LinearMethod" and the weight memory prove it.
GPTQ_W4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
           "checkpoint_format": "gptq", "lm_head": False,
           "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]}

CONFIGS = ("bf16", "fp8", "w4a16", "ostquant_w4a8kv4", "ostquant_w4a4kv4", "ostquant_w4a4_fp8kv",
           "ostquant_w4a4kv4_vllm_attn")
# ostquant_w4a4_fp8kv: the same W4A4 weights with vLLM's FP8 KV cache (issue 7's "same weights" baseline);
# ostquant_w4a4kv4_vllm_attn: the int4 cache read and written by vLLM's own Triton path instead of ours.
CONFIG_ENV = {"ostquant_w4a4kv4_vllm_attn": {"OSTQUANT_KV4_ATTENTION": "vllm"}}


# Tensor parallelism: NVLink multicast must stay off on the lent machines (KINDS.md). vLLM 0.26 fuses
# all-reduce + RMSNorm through FlashInfer on Hopper at TP > 1, whose default backend (mnnvl) creates
# multicast objects; that fusion is off for every config alike, as is the symmetric-memory all-reduce.
# vLLM's own custom all-reduce (CUDA IPC) and NCCL (NCCL_NVLS_ENABLE=0) carry the sums.
TP_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
          "VLLM_ALLREDUCE_USE_SYMM_MEM": "0", "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
          "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm"}
TP_PASS_CONFIG = {"fuse_allreduce_rms": False}


def hadamard_blocks(shape: str) -> int:
    """H_down's blocks as calibration picks them (hadamard.default_blocks): what lets every TP <= 8
    split it (tensor_parallel.py)."""
    from ostquant_vllm.hadamard import default_blocks

    return default_blocks(SHAPES[shape]["intermediate_size"])


def engine_args(config: str, on_gpu: bool, shape: str) -> tuple[dict | None, dict]:
    """(quantization_config for config.json, extra LLM(...) kwargs) of a config at a shape."""
    if config == "bf16":
        return None, {}
    if config == "fp8":  # vLLM quantizes the bf16 weights at load: per-tensor FP8 W8A8, dynamic acts
        return None, {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    if config == "w4a16":
        return dict(GPTQ_W4), {}
    if config.startswith("ostquant_"):
        from ostquant_vllm.format import QuantFormat

        act_bits = 8 if config == "ostquant_w4a8kv4" else 4
        kv_bits = 16 if config == "ostquant_w4a4_fp8kv" else 4
        fmt = QuantFormat(act_bits=act_bits, kv_bits=kv_bits, online_hadamard={"down_proj": True, "qk": True},
                          hadamard_blocks=hadamard_blocks(shape))
        fmt.validate()
        # vLLM's int4 cache on the GPU; the CPU backend has none: the plugin emulates it (kv_cpu.py)
        if kv_bits == 16:
            kv = {"kv_cache_dtype": "fp8"} if on_gpu else {}
        else:
            kv = {"kv_cache_dtype": "int4_per_token_head"} if on_gpu else {}
        return fmt.to_dict(), {"quantization": "ostquant", **kv}
    raise SystemExit(f"unknown config {config!r}: choose from {', '.join(CONFIGS)}")


def write_model_dir(path: str, shape: str, quant_cfg: dict | None) -> str:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, **SHAPES[shape]}
    if quant_cfg:
        cfg["quantization_config"] = quant_cfg
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------
# child: one config, one engine
# ------------------------------------------------------------------------------------------------
def run_config(a) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    on_gpu = torch.cuda.is_available()
    qcfg, kw = engine_args(a.config, on_gpu, a.shape)
    model_dir = write_model_dir(os.path.join(a.work, a.config), a.shape, qcfg)
    batches = [int(b) for b in a.batches.split(",")]
    max_len = max(a.prefill_len, a.input_len + a.output_len) + 16
    if a.eager or not on_gpu:
        kw["enforce_eager"] = True
    else:  # capture exactly the batch sizes measured (and the powers of two below): a shorter start
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, *batches})
        kw["compilation_config"] = {"cudagraph_capture_sizes": [s for s in sizes if s <= max(batches)]}
    if a.tp > 1:
        kw["tensor_parallel_size"] = a.tp
        kw.setdefault("compilation_config", {})["pass_config"] = dict(TP_PASS_CONFIG)
    t0 = time.time()
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=max_len, max_num_seqs=max(batches), max_num_batched_tokens=max(8192, a.prefill_len),
              enable_prefix_caching=False, gpu_memory_utilization=a.gpu_memory_utilization, **kw)
    start_s = time.time() - t0
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[a.shape]["vocab_size"]

    def prompts(n, length):
        ids = torch.randint(10, vocab - 10, (n, length), generator=gen).tolist()
        return [TokensPrompt(prompt_token_ids=p) for p in ids]

    def timed(ps, max_tokens, keep=None):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t = time.perf_counter()  # generate returns finished outputs: the GPU work is inside
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        if keep is not None:
            keep.extend(list(o.outputs[0].token_ids) for o in outs)
        return dt, sum(len(o.outputs[0].token_ids) for o in outs)

    # warm-up; its greedy tokens (the same prompts in every run): settings meant to change only the speed must
    # leave them as they are (dummy weights, so a weak check, but a mis-wired graph shows)
    warmup_tokens = []
    timed(prompts(min(4, max(batches)), a.input_len), 16, warmup_tokens)
    if a.profile:
        return {"config": a.config, "profile": profile_decode(prompts, timed, a), "warmup_tokens": warmup_tokens,
                **engine_facts(llm)}
    row = {"config": a.config, "engine_args": dict(kw), "engine_start_s": start_s, "decode": [],
           "warmup_tokens": warmup_tokens}
    for b in batches:
        runs, secs, first = [], [], []
        for _ in range(a.repeats if b <= 16 else max(1, a.repeats - 1)):
            dt, ntok = timed(prompts(b, a.input_len), a.output_len)
            runs.append(ntok / dt)
            secs.append(dt)
            first.append(timed(prompts(b, a.input_len), 1)[0])  # the same batch's prefill and first token
        # the decode steps alone: the run less a 1-token run of the same batch (its B prompts' prefill)
        steps_s = statistics.median(secs) - statistics.median(first)
        step_tok_s = b * (a.output_len - 1) / steps_s if steps_s > 0 else None
        row["decode"].append({"batch": b, "decode_tok_s": statistics.median(runs), "runs_tok_s": runs,
                              "decode_steps_tok_s": step_tok_s, "first_token_runs_s": first})
        print(f"[e2e] {a.config} batch {b}: {statistics.median(runs):.1f} output tok/s "
              f"(decode steps alone {step_tok_s or float('nan'):.1f})", flush=True)
    lat = [timed(prompts(1, a.prefill_len), 1)[0] * 1e3 for _ in range(a.prefill_repeats + 1)][1:]
    row["prefill_ms"] = statistics.median(lat)
    row["prefill_runs_ms"] = lat
    print(f"[e2e] {a.config} prefill {a.prefill_len}: {row['prefill_ms']:.1f} ms", flush=True)
    row.update(engine_facts(llm))
    return row


def engine_facts(llm) -> dict:
    """What an in-process engine can tell (VLLM_ENABLE_V1_MULTIPROCESSING=0); the log has the rest."""
    out = {}
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        if cc.num_gpu_blocks:
            out["kv_blocks"] = int(cc.num_gpu_blocks)
            out["block_size"] = int(cc.block_size)
    except Exception:
        pass
    from ostquant_vllm import ops

    if ops.CALLS:  # in-process engine only (with multiprocessing the linears run in the engine's process)
        out["ostquant_linear_calls"] = dict(ops.CALLS)
    return out


def profile_decode(prompts, timed, a) -> dict:
    """GPU time by kernel over a generation at the largest of --batches (128 in, 128 out), grouped into what
    the step is made of (kernels replayed from CUDA graphs are recorded by CUPTI too), the same for the
    prefill (a run of the same prompts with one output token) and for the decode steps alone (the
    generation minus that run). Needs the engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0."""
    from torch.profiler import ProfilerActivity, profile

    b, out_len = max(int(x) for x in a.batches.split(",")), 128
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        prefill_wall_s = timed(prompts(b, a.input_len), 1)[0]
    prefill = _kernel_times(prof)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        dt, ntok = timed(prompts(b, a.input_len), out_len)
    per_kernel = _kernel_times(prof)
    steps = out_len - 1
    decode = {k: max(0.0, t - prefill.get(k, 0.0)) / steps for k, t in per_kernel.items()}  # µs a step
    total = sum(per_kernel.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    top_dec = sorted(decode.items(), key=lambda kv: -kv[1])[:15]
    top_pre = sorted(prefill.items(), key=lambda kv: -kv[1])[:15]
    return {"batch": b, "output_tokens": ntok, "wall_s": dt, "gpu_busy_s": total / 1e6,
            "fraction_by_category": {c: t / total for c, t in _by_category(per_kernel).items()},
            "top_kernels_ms": [[k[:120], t / 1e3] for k, t in top],
            # wall minus GPU time: the prefill's host work and syncs (the profiler's own overhead included)
            "prefill_gpu_ms": sum(prefill.values()) / 1e3, "prefill_wall_ms": prefill_wall_s * 1e3,
            "prefill_ms_by_category": {c: t / 1e3 for c, t in _by_category(prefill).items()},
            "top_prefill_kernels_ms": [[k[:120], t / 1e3] for k, t in top_pre],
            "decode_step_us": sum(decode.values()),
            "decode_step_us_by_category": _by_category(decode),
            "top_decode_kernels_us_per_step": [[k[:120], t] for k, t in top_dec]}


def _kernel_times(prof) -> dict:
    """µs of GPU time per kernel name in a torch profiler run."""
    import torch

    per_kernel = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + t
    return per_kernel


def _by_category(per_kernel: dict) -> dict:
    cats = {}
    for k, t in per_kernel.items():
        c = kernel_category(k)
        cats[c] = cats.get(c, 0.0) + t
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]))


_CATEGORIES = [
    # ours: csrc's kernels, and kind 40 (CUTLASS's device_kernel, named by our epilogue functor in csrc/cutlass_gemm.cu)
    ("ostquant_int4_gemm", r"gemm_(mma|dec|wgmma)_kernel|ShiftRight4"),
    ("ostquant_quantize_act", r"quant_plain|quant_had"),
    ("attention", r"kv4::|attn|attention|paged|unified|reshape_and_cache|kv_cache|flash|fmha"),
    ("dense_gemm", r"nvjet|gemm|cutlass|xmma|machete|marlin|Marlin|Machete|cublas|scaled_mm|sm90"),
    ("quantize_other", r"quant|fp8"),
    ("norm_act_rope", r"rms|norm|silu|act_and_mul|rotary|rope"),
    ("sampling_logits", r"argmax|softmax|sort|topk|sample|gather|index"),
]


def kernel_category(name: str) -> str:
    for cat, pat in _CATEGORIES:
        if re.search(pat, name, re.I):
            return cat
    return "other"


def child_main(a) -> None:
    if a.profile:  # the profiler sees only this process: run the engine core in it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if a.tp > 1:
        os.environ.update(TP_ENV)
    os.environ.update(CONFIG_ENV.get(a.config, {}))
    row = run_config(a)
    print("E2E_ROW " + json.dumps(row), flush=True)
    os._exit(0)  # skip vLLM's slow teardown: the parent only needs the row


# ------------------------------------------------------------------------------------------------
# parent: a process per config, rows merged into --out
# ------------------------------------------------------------------------------------------------
LOG_FACTS = {
    "kv_cache_tokens": (r"[GC]PU KV cache size: ([\d,]+) tokens", lambda s: int(s.replace(",", ""))),
    "weights_gib": (r"Model loading took ([\d.]+) ?GiB", float),
    "linear_kernel": (r"Using (\w+) for (\w+LinearMethod)", str),
    "attention_backend": (r"Using (\w+) (?:attention )?backend", str),
}


def parse_log(text: str) -> dict:
    out = {}
    for key, (pat, conv) in LOG_FACTS.items():
        m = re.findall(pat, text)
        if m:
            v = m[-1]
            out[key] = " for ".join(v) if isinstance(v, tuple) else conv(v)
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "vllm", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable: {type(e).__name__}"
    # nvidia-smi, not torch.cuda: a CUDA context here would take memory from the engines measured
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.strip().splitlines()
        out["gpu"], out["gpu_count"] = names[0], len(names)
    except Exception:
        out["gpu"] = "cpu"
    return out


def flat_rows(cfg_rows: list[dict]) -> list[dict]:
    """The issue's result schema: one row a (config, batch)."""
    rows = []
    for r in cfg_rows:
        for d in r.get("decode", []):
            rows.append({"config": r["config"], "batch": d["batch"], "decode_tok_s": d["decode_tok_s"],
                         "prefill_ms_2048": r.get("prefill_ms"), "kv_cache_tokens": r.get("kv_cache_tokens")})
    return rows


def ratios(cfg_rows: list[dict]) -> dict:
    """Decode throughput and KV room of every config against bf16 and FP8 of the same run, and the
    int4 KV configs against the same weights with an FP8 cache (issue 7's baselines)."""
    by = {r["config"]: r for r in cfg_rows}
    out = {}
    for r in cfg_rows:
        rr = {}
        bases = ("bf16", "fp8") + (("ostquant_w4a4_fp8kv", "ostquant_w4a4kv4_vllm_attn")
                                   if r["config"].startswith("ostquant_w4a4kv4") else ())
        for base in bases:
            if base not in by or base == r["config"]:
                continue
            bd = {d["batch"]: d for d in by[base].get("decode", [])}
            for d in r.get("decode", []):
                ref = bd.get(d["batch"])
                if ref is None:
                    continue
                rr[f"decode_vs_{base}_b{d['batch']}"] = d["decode_tok_s"] / ref["decode_tok_s"]
                if d.get("decode_steps_tok_s") and ref.get("decode_steps_tok_s"):
                    rr[f"decode_steps_vs_{base}_b{d['batch']}"] = d["decode_steps_tok_s"] / ref["decode_steps_tok_s"]
            if r.get("kv_cache_tokens") and by[base].get("kv_cache_tokens"):
                rr[f"kv_tokens_vs_{base}"] = r["kv_cache_tokens"] / by[base]["kv_cache_tokens"]
            if r.get("prefill_ms") and by[base].get("prefill_ms"):
                rr[f"prefill_speedup_vs_{base}"] = by[base]["prefill_ms"] / r["prefill_ms"]
        out[r["config"]] = rr
    return out


def parent_main(a, argv: list[str]) -> None:
    result = {}
    if a.resume and os.path.exists(a.out):
        with open(a.out) as f:
            result = json.load(f)
    ver = versions()
    if result.get("gpu") and result["gpu"] != ver["gpu"]:
        raise SystemExit(f"{a.out} was measured on {result['gpu']}, this is {ver['gpu']}: ratios need one GPU")
    if result.get("configs") and result.get("tensor_parallel_size", 1) != a.tp:
        raise SystemExit(f"{a.out} holds tensor parallel size {result.get('tensor_parallel_size', 1)} rows, "
                         f"this run is --tp {a.tp}: ratios need one TP degree (use another --out)")
    result.update({"gpu": ver["gpu"], "vllm": ver["vllm"], "versions": ver, "shape": a.shape,
                   "tensor_parallel_size": a.tp})
    if not a.profile:  # a profile run (--batches 64 or 256) leaves the measurement settings as they are
        result["settings"] = {"input_len": a.input_len, "output_len": a.output_len, "batches": a.batches,
                              "prefill_len": a.prefill_len, "gpu_memory_utilization": a.gpu_memory_utilization,
                              "cuda_graphs": not a.eager and ver["gpu"] != "cpu", "load_format": "dummy",
                              "prefix_caching": False, "ostquant_hadamard_blocks": hadamard_blocks(a.shape),
                              **({"tp_env": TP_ENV, "tp_pass_config": TP_PASS_CONFIG} if a.tp > 1 else {})}
    result.setdefault("commands", [])
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OSTQUANT_") and k not in
                   ("OSTQUANT_CACHE", "OSTQUANT_KERNELS_LIB"))  # measurement settings travel with the command
    result["commands"].append((env + " " if env else "") + "python -m benchmarks.e2e_vllm " + " ".join(argv))
    cfg_rows = [r for r in result.get("configs", []) if not (a.redo and r["config"] in a.configs.split(","))]
    done = {r["config"] for r in cfg_rows}
    for config in a.configs.split(","):
        engine_args(config, False, a.shape)  # an unknown name stops here, before any engine starts
    work = a.work or tempfile.mkdtemp(prefix="ostq-e2e-")
    for config in a.configs.split(","):
        if config in done and not a.profile:
            print(f"[e2e] {config}: already in {a.out}, skipped (--redo to measure again)", flush=True)
            continue
        cmd = [sys.executable, "-m", "benchmarks.e2e_vllm", "--child", "--config", config, "--work", work,
               *child_flags(a)]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith("E2E_ROW "):
                sys.stdout.write(line)
        proc.wait()
        text = "".join(lines)
        rows = [json.loads(l[len("E2E_ROW "):]) for l in lines if l.startswith("E2E_ROW ")]
        if proc.returncode != 0 or not rows:
            print(f"[e2e] {config} FAILED (exit {proc.returncode}); rows so far kept in {a.out}", flush=True)
            result.setdefault("failures", []).append({"config": config, "exit": proc.returncode,
                                                      "log_tail": text[-3000:]})
            continue
        if a.profile:  # batch 64 under the config's name (the files before), other batches beside it
            b = rows[0]["profile"]["batch"]
            result.setdefault("profiles", {})[config if b == 64 else f"{config} batch {b}"] = rows[0]
            save(a.out, result, cfg_rows)
            continue
        row = {**rows[0], **parse_log(text), "wall_s": time.time() - t0}
        if "kv_cache_tokens" not in row and row.get("kv_blocks"):
            row["kv_cache_tokens"] = row["kv_blocks"] * row["block_size"]
        cfg_rows = [r for r in cfg_rows if r["config"] != config] + [row]
        save(a.out, result, cfg_rows)
    save(a.out, result, cfg_rows)
    print(json.dumps({"rows": flat_rows(cfg_rows), "ratios": ratios(cfg_rows)}, indent=1))


def save(path: str, result: dict, cfg_rows: list[dict]) -> None:
    order = {c: i for i, c in enumerate(CONFIGS)}
    cfg_rows = sorted(cfg_rows, key=lambda r: order.get(r["config"], 99))
    result["configs"] = cfg_rows
    result["rows"] = flat_rows(cfg_rows)
    result["ratios"] = ratios(cfg_rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def child_flags(a) -> list[str]:
    out = ["--shape", a.shape, "--batches", a.batches, "--input-len", str(a.input_len), "--output-len",
           str(a.output_len), "--prefill-len", str(a.prefill_len), "--repeats", str(a.repeats),
           "--prefill-repeats", str(a.prefill_repeats), "--gpu-memory-utilization", str(a.gpu_memory_utilization),
           "--tp", str(a.tp)]
    if a.eager:
        out.append("--eager")
    if a.profile:
        out.append("--profile")
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--out", default="/tmp/e2e_vllm.json", help="result JSON (merged after every config)")
    p.add_argument("--resume", action="store_true", help="keep the configs already in --out")
    p.add_argument("--redo", action="store_true", help="with --resume: measure the named configs again")
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor_parallel_size (GPUs)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="timed runs a batch size (one fewer above 16)")
    p.add_argument("--prefill-repeats", type=int, default=10,
                   help="timed single-prompt prefills (median); one process's runs of one config spread 35-100 ms "
                        "at 2048 tokens on the H100 (session 21), so 5 did not separate configs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    p.add_argument("--profile", action="store_true",
                   help="instead of measuring: GPU time shares by kernel of a decode at the largest of --batches "
                        "(pass --batches 64 or 256)")
    p.add_argument("--work", default="", help="folder for the config-only model folders")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child_main(a)
    else:
        parent_main(a, argv)


if __name__ == "__main__":
    main()
