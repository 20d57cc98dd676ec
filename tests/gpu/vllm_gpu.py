"""On the H100 with vLLM 0.26 (issues 4 and 6): calibrate a checkpoint of the real default model on
the GPU, serve it with `LLM(..., quantization="ostquant", kv_cache_dtype="int4_per_token_head")`, and
compare vLLM's greedy tokens with calibration's fake-quant model (conftest.agreement). Records
which linear path ran (our kernels or the reference) and writes $OUT/vllm_gpu.json.

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
        llm = LLM(model=ckpt, quantization="ostquant", dtype="bfloat16", max_model_len=512, enforce_eager=True,
                  gpu_memory_utilization=0.3, seed=0, **kv)
        start_s = time.time() - t0
        ref = load_fake_quant_model(ckpt, torch.float32, kv_cache_dtype=torch.bfloat16)  # on the CPU, as agreement() feeds it
        res = agreement(llm, ref, REAL_TEXT_PROMPTS, 64)
        calls = {k: ops.CALLS[k] - before.get(k, 0) for k in ops.CALLS}
        row = {"preset": preset, "checkpoint": "quarot (calibrate.pipeline defaults) " + preset, **kv,
               "calibrate_s": calib_s, "engine_start_s": start_s, "linear_calls": calls, **res}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        del llm
        import gc
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "vllm_gpu.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
