"""On the H100 with vLLM 0.26 (issues 4 and 6): calibrate a checkpoint of the real default model on
the GPU, serve it with `LLM(..., quantization="ostquant", kv_cache_dtype="int4_per_token_head")`
(torch.compile + CUDA graphs, as served; VLLM_GPU_EAGER=1 for eager), and compare vLLM's greedy
tokens with calibration's fake-quant model (conftest.agreement). Records which linear path ran
(our kernels or the reference). Then `vllm serve CKPT --quantization ostquant --kv-cache-dtype
int4_per_token_head`: completions (equal to the offline greedy text), chat, streaming chat.
Writes $OUT/vllm_gpu.json.

    bash tests/gpu/vllm_gpu.sh     (after the vLLM bundle and the model reached the machine)
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import REAL_TEXT_PROMPTS, agreement  # noqa: E402


def main():
    from vllm import LLM

    from calibrate.pipeline import CalibConfig, calibrate
    from calibrate.qmodel import load_fake_quant_model
    from ostquant_vllm import kernels, ops

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernels.available(),
           "rows": []}
    import vllm
    out["vllm"] = vllm.__version__
    presets = sys.argv[1:] or ["w4a4kv4", "w4a8kv4"]
    for preset in presets:
        ckpt = f"/tmp/ckpt-quarot-{preset}"
        t0 = time.time()
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            calibrate(CalibConfig(method="quarot", preset=preset, eval_float=False, qsur=False), out_dir=ckpt)
        calib_s = time.time() - t0
        kv = {"kv_cache_dtype": "int4_per_token_head"} if preset.endswith("kv4") else {}
        before = dict(ops.CALLS)
        t0 = time.time()
        eager = os.environ.get("VLLM_GPU_EAGER", "0") == "1"
        llm = LLM(model=ckpt, quantization="ostquant", dtype="bfloat16", max_model_len=512, enforce_eager=eager,
                  gpu_memory_utilization=0.3, seed=0, **kv)
        start_s = time.time() - t0
        ref = load_fake_quant_model(ckpt, torch.float32, kv_cache_dtype=torch.bfloat16)  # on the CPU, as agreement() feeds it
        res = agreement(llm, ref, REAL_TEXT_PROMPTS, 64)
        calls = {k: ops.CALLS[k] - before.get(k, 0) for k in ops.CALLS}
        from vllm import SamplingParams

        greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        ours = [list(o.outputs[0].token_ids) for o in llm.generate(REAL_TEXT_PROMPTS, greedy, use_tqdm=False)]

        offline = llm.generate([SERVE_PROMPT], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].text
        row = {"preset": preset, "checkpoint": "quarot (calibrate.pipeline defaults) " + preset, **kv,
               "cuda_graphs": not eager, "calibrate_s": calib_s, "engine_start_s": start_s, "linear_calls": calls,
               **res}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        del llm
        import gc
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
        if kv:  # issue 7: the same checkpoint with vLLM's own int4 KV attention instead of our kernels
            os.environ["OSTQUANT_KV4_ATTENTION"] = "vllm"
            llm = LLM(model=ckpt, quantization="ostquant", dtype="bfloat16", max_model_len=512, enforce_eager=eager,
                      gpu_memory_utilization=0.3, seed=0, **kv)
            theirs = [list(o.outputs[0].token_ids) for o in llm.generate(REAL_TEXT_PROMPTS, greedy, use_tqdm=False)]
            vllm_res = agreement(llm, ref, REAL_TEXT_PROMPTS, 64)  # vLLM's int4 path against calibration's model
            del os.environ["OSTQUANT_KV4_ATTENTION"]
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
            same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
            first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
            row["kv4_kernels_vs_vllm_int4"] = {
                "prompts": len(ours), "tokens_each": 64, "identical_sequences": sum(x == y for x, y in zip(ours, theirs)),
                "token_agreement": same / sum(len(x) for x in ours), "first_divergence": first,
                "vllm_int4_vs_calibration": vllm_res}
            print(json.dumps(row["kv4_kernels_vs_vllm_int4"]), flush=True)
        save(out)
        if preset == presets[0] and os.environ.get("VLLM_GPU_SKIP_SERVE", "0") != "1":
            row["vllm_serve"] = serve_check(ckpt, kv, offline)
            print(json.dumps(row["vllm_serve"]), flush=True)
            save(out)


def save(out: dict) -> None:  # after every step: a call that runs out of time keeps what it measured
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "vllm_gpu.json"), "w") as f:
        json.dump(out, f, indent=1)


SERVE_PROMPT = "The capital of France is"


def serve_check(ckpt: str, kv: dict, offline_text: str) -> dict:
    """`vllm serve` (the console script) on the checkpoint: completion == offline greedy text, chat,
    streamed chat chunks."""
    import subprocess

    import requests

    from ostquant_vllm.serve import stop_server, wait_healthy

    port, log = 8011, "/tmp/vllm_serve.log"
    cmd = ["vllm", "serve", ckpt, "--quantization", "ostquant", "--served-model-name", "ostq", "--port", str(port),
           "--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--dtype", "bfloat16",
           "--generation-config", "vllm"]  # no sampling defaults from generation_config.json: as LLM.generate
    if kv:
        cmd += ["--kv-cache-dtype", kv["kv_cache_dtype"]]
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    out = {"command": " ".join(cmd)}
    try:
        out["startup_s"] = wait_healthy(proc, base, 400, log)
        r = requests.post(base + "/v1/completions", json={"model": "ostq", "prompt": SERVE_PROMPT, "max_tokens": 32,
                                                          "temperature": 0, "ignore_eos": True}, timeout=120)
        text = r.json()["choices"][0]["text"]
        out.update(completion_status=r.status_code, completion=text, equals_offline=text == offline_text)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = requests.post(base + "/v1/chat/completions", json={"model": "ostq", "messages": msgs, "max_tokens": 16,
                                                               "temperature": 0}, timeout=120)
        chat = r.json()["choices"][0]["message"]["content"]
        out.update(chat_status=r.status_code, chat=chat)
        chunks = []
        with requests.post(base + "/v1/chat/completions", json={"model": "ostq", "messages": msgs, "max_tokens": 16,
                                                                "temperature": 0, "stream": True},
                           stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    d = json.loads(line[6:])
                    if d["choices"] and d["choices"][0]["delta"].get("content"):
                        chunks.append(d["choices"][0]["delta"]["content"])
        out.update(stream_chunks=len(chunks), stream_equals_chat="".join(chunks) == chat)
    except Exception as e:  # noqa: BLE001  (recorded: the rest of the run still reports)
        out["error"] = f"{type(e).__name__}: {e}"[:3000]
    finally:
        stop_server(proc)
    return out


if __name__ == "__main__":
    main()
