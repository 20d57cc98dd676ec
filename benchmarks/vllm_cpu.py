"""vLLM-CPU benchmark of the ostquant plugin on the real default model (SmolLM2-135M-Instruct).

Writes benchmarks/results/vllm_cpu_<model>.json:
  greedy_agreement   (of the w4a4kv4 checkpoint) token agreement of vLLM (float32) with calibration's fake-quant model
                     (calibrate.qmodel, float32), teacher-forced on vLLM's greedy tokens
                     (1.0 <=> identical greedy outputs), over `prompts` x `tokens_per_prompt`;
                     per preset under "agreement"
  tokens_per_s       offline LLM.generate throughput (32 prompts x 64 tokens, one batch), bf16 float
                     model vs the ostquant checkpoint (bf16); float32 rows alongside
  server_start_s     `python -m ostquant_vllm.serve CKPT` until /health answers 200

    python benchmarks/vllm_cpu.py [--ckpt DIR] [--presets w4a4kv4,w4a8kv4,w4a16]
    python benchmarks/vllm_cpu.py --ckpt DIR --agreement-only NAME

Without --ckpt the checkpoints are the fast QuaRot-style RTN exports of tests/conftest.py
(random-Hadamard R_res + H_down + RTN, written by calibrate.export). --agreement-only measures only the
agreement of --ckpt (e.g. one `ostquant calibrate` made) and adds it to the JSON's "agreement" as NAME,
with its checkpoint's calibration report (preset, perplexity) and the command.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _cleanup():
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def throughput(model, prompts, tokens, dtype="bfloat16", **kw) -> float:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0, **kw)
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    _cleanup()
    return n / dt


def server_start(ckpt) -> float:
    from conftest import free_port

    from ostquant_vllm.serve import stop_server, wait_healthy

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.Popen([sys.executable, "-m", "ostquant_vllm.serve", ckpt, "--host", "127.0.0.1", "--port",
                             str(port), "--enforce-eager", "--max-model-len", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        return wait_healthy(proc, f"http://127.0.0.1:{port}", 600)
    finally:
        stop_server(proc)


def main(argv=None) -> int:
    import torch

    from calibrate.assets import default_model_dir
    from calibrate.qmodel import load_fake_quant_model
    from conftest import REAL_TEXT_PROMPTS, agreement, export_real_rtn

    from ostquant_vllm.compat import vllm_version

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="float model folder (default: calibrate's default model)")
    ap.add_argument("--ckpt", default=None, help="an ostquant checkpoint (its preset is read from it)")
    ap.add_argument("--presets", default="w4a4kv4,w4a8kv4,w4a16")
    ap.add_argument("--work", default="/tmp/ostquant_bench")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--agreement-only", metavar="NAME", default=None,
                    help="with --ckpt: add its agreement to the existing JSON as NAME, nothing else")
    a = ap.parse_args(argv)
    if a.agreement_only and not a.ckpt:
        ap.error("--agreement-only needs --ckpt")
    model = a.model or default_model_dir()
    prompts = REAL_TEXT_PROMPTS[: a.prompts]
    ckpts = {}
    if a.ckpt:
        ckpts["ckpt"] = a.ckpt
    else:
        for p in a.presets.split(","):
            d = os.path.join(a.work, p)
            if not os.path.exists(os.path.join(d, "config.json")):
                export_real_rtn(d, p)
            ckpts[p] = d
    from vllm import LLM

    result = {"model": os.path.basename(model.rstrip("/")), "prompts": len(prompts), "tokens_per_prompt": a.tokens,
              "agreement": {}}
    for name, d in ckpts.items():
        llm = LLM(model=d, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
        ref = load_fake_quant_model(d, torch.float32, kv_cache_dtype=torch.float32)
        t = time.perf_counter()
        res = agreement(llm, ref, prompts, a.tokens)
        res["seconds"] = round(time.perf_counter() - t, 1)
        result["agreement"][name] = res
        print(name, res, flush=True)
        del llm, ref
        _cleanup()
    command = " ".join([os.path.basename(sys.executable), "benchmarks/vllm_cpu.py", *(argv or sys.argv[1:])])
    if a.agreement_only:
        out = os.path.join(HERE, "results", f"vllm_cpu_{result['model']}.json")
        with open(out) as f:
            merged = json.load(f)
        res = result["agreement"]["ckpt"]
        report = os.path.join(a.ckpt, "ostquant_report.json")
        if os.path.exists(report):
            with open(report) as f:
                rep = json.load(f)
            res["calibration"] = {"ppl": rep.get("ppl"), "ppl_float": rep.get("ppl_float"),
                                  "seconds": rep.get("seconds"), "device": rep.get("device"),
                                  "quantization_config": rep.get("quantization_config")}
        res["command"] = command
        merged["agreement"][a.agreement_only] = res
        with open(out, "w") as f:
            json.dump(merged, f, indent=2)
        print(json.dumps(res, indent=2))
        return 0
    main_ckpt = ckpts.get("w4a4kv4") or next(iter(ckpts.values()))
    main_name = "w4a4kv4" if "w4a4kv4" in ckpts else next(iter(ckpts))
    result["greedy_agreement"] = result["agreement"][main_name]["token_agreement"]
    result["greedy_agreement_preset"] = main_name
    # bf16: the float model as served; ostquant: the checkpoint in bf16 (the CPU reference path
    # does its integer GEMM in float32); float32 rows for comparison (no AVX512-BF16 here)
    result["tokens_per_s"] = {"bf16": round(throughput(model, prompts, a.tokens), 2),
                              "ostquant": round(throughput(main_ckpt, prompts, a.tokens), 2),
                              "float32": round(throughput(model, prompts, a.tokens, dtype="float32"), 2),
                              "ostquant_float32": round(throughput(main_ckpt, prompts, a.tokens, dtype="float32"), 2)}
    print("tokens_per_s", result["tokens_per_s"], flush=True)
    result["server_start_s"] = round(server_start(main_ckpt), 1)
    result["command"] = command
    result["vllm"] = vllm_version()
    result["torch"] = torch.__version__
    result["cpu_threads"] = os.cpu_count()
    result["checkpoints"] = ckpts
    out = os.path.join(HERE, "results", f"vllm_cpu_{result['model']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
