"""Issue 8 on a multi-GPU machine: one checkpoint of the real default model greedy-decoded by vLLM at
tensor parallel size 1 and 2 (our kernels, int4 KV cache, vLLM's sharding).

vLLM cannot split SmolLM2-135M over 2 ranks: 9 query heads and 3 KV heads do not divide by 2. So the
checkpoint is widened first by an exact transform (`widen_heads`): every query and KV head is stored
twice, and o_proj reads the first copy of each head (the second copy's input columns are zero
levels). Per token and head, attention and the int4 KV quantizer see the same values as before;
o_proj's per-token activation quantizer sees each value twice (same min and max, so the same scale
and zero point) and the zero levels add nothing to the integer dot products. So at TP 1 the widened
checkpoint computes what the original does (checked: the same greedy tokens), and TP 2 then splits 18
query / 6 KV heads and down_proj's I_8 (x) H_192 as it would any model's.

What TP changes by design (tensor_parallel.py): the row-parallel o_proj and down_proj quantize each
rank's slice of a token with its own scale. The script reports how much of the greedy output that
moves, and the teacher-forced agreement of each run with calibration's fake-quant model built for its
TP degree (load_fake_quant_model(tensor_parallel_size=tp)).

    python3 tests/gpu/vllm_tp.py CKPT OUT.json      (tests/gpu/vllm_tp.sh PRESET... on the GPU machine)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
N_TOKENS = 64


def widen_heads(src: str, dst: str, factor: int = 2) -> str:
    """Copy the ostquant checkpoint `src` to `dst` with every query and KV head stored `factor` times
    (exact; see the module docstring). Returns dst."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    sd = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in sd.items():
        proj = name.rsplit(".", 2)[-2]
        if proj in ("q_proj", "k_proj", "v_proj"):          # output rows, head-major: repeat each head
            heads = nh if proj == "q_proj" else nkv
            t = t.reshape(heads, hd, *t.shape[1:]).repeat_interleave(factor, 0).reshape(heads * factor * hd,
                                                                                          *t.shape[1:])
        elif proj == "o_proj" and name.endswith(".qweight"):  # input columns (2 a byte): head, then zeros
            n = t.shape[0]
            per = t.reshape(n, nh, hd // 2)
            zeros = torch.zeros_like(per).repeat(1, 1, factor - 1)
            t = torch.cat([per, zeros], 2).reshape(n, nh * factor * hd // 2)
        elif proj == "o_proj" and t.dim() > 1:
            raise ValueError(f"{name}: group scales along o_proj's input are not supported by widen_heads")
        out[name] = t.contiguous()
    # GQA: query head j reads KV head j // (nh / nkv); with both repeated, 2i and 2i+1 (copies of head i)
    # read copies of head i's KV head, because the group size nh / nkv is unchanged
    cfg.update(num_attention_heads=nh * factor, num_key_value_heads=nkv * factor, head_dim=hd)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def child(ckpt: str, tp: int) -> None:
    """One engine: greedy tokens and teacher-forced agreement with calibration's model, one JSON line."""
    from conftest import REAL_TEXT_PROMPTS, agreement
    from vllm import LLM, SamplingParams

    from benchmarks.e2e_vllm import TP_ENV, TP_PASS_CONFIG
    from calibrate.qmodel import load_fake_quant_model

    os.environ.update(TP_ENV)  # NVLink multicast off (the lent machines' rule); read by vLLM's workers
    t0 = time.time()
    llm = LLM(model=ckpt, quantization="ostquant", dtype="bfloat16", max_model_len=512, enforce_eager=True,
              gpu_memory_utilization=0.3, seed=0, kv_cache_dtype="int4_per_token_head", tensor_parallel_size=tp,
              compilation_config={"pass_config": dict(TP_PASS_CONFIG)})
    start_s = time.time() - t0
    greedy = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(REAL_TEXT_PROMPTS, greedy, use_tqdm=False)]
    # the model vLLM should serve at this TP degree: at TP 2, o_proj's and down_proj's activations
    # quantized per rank (what TP changes by design, tensor_parallel.py)
    ref = load_fake_quant_model(ckpt, torch.float32, kv_cache_dtype=torch.bfloat16, tensor_parallel_size=tp)
    res = agreement(llm, ref, REAL_TEXT_PROMPTS, N_TOKENS)
    print("TP_ROW " + json.dumps({"checkpoint": ckpt, "tp": tp, "engine_start_s": start_s, "tokens": tokens,
                                  "reference_tensor_parallel_size": tp, **res}), flush=True)
    os._exit(0)


def run(ckpt: str, tp: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", ckpt, str(tp)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, check=False)
    rows = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("TP_ROW ")]
    if not rows:
        print(p.stdout[-6000:])
        raise SystemExit(f"vLLM at TP {tp} on {ckpt} failed (exit {p.returncode})")
    return rows[0]


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def compare(a: list, b: list) -> dict:
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return {"prompts": len(a), "tokens_each": N_TOKENS, "identical_sequences": sum(s == t for s, t in zip(a, b)),
            "same_token_fraction": sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) / sum(map(len, a)),
            "first_difference_median": sorted(first)[len(first) // 2], "first_difference_min": min(first)}


def main(ckpt: str, out_path: str) -> None:
    """One checkpoint: original at TP 1, widened at TP 1 and 2. Appends a row to out_path."""
    import vllm

    wide = widen_heads(ckpt, ckpt.rstrip("/") + "-widened")
    # VLLM_TP_SKIP_ORIGINAL=1: leave out the original checkpoint's run (the widening's exactness is
    # checked on the CPU and was measured on the GPU), one engine less on a short device budget
    skip = os.environ.get("VLLM_TP_SKIP_ORIGINAL") == "1"
    runs = {**({} if skip else {"original_tp1": run(ckpt, 1)}), "widened_tp1": run(wide, 1), "widened_tp2": run(wide, 2)}
    tok = {k: r.pop("tokens") for k, r in runs.items()}
    result = _read(out_path) if os.path.exists(out_path) else {
        "gpu": torch.cuda.get_device_name(), "gpu_count": torch.cuda.device_count(), "vllm": vllm.__version__,
        "torch": torch.__version__, "command": "bash tests/gpu/vllm_tp.sh PRESET...", "rows": []}
    qc = _read(os.path.join(ckpt, "config.json"))["quantization_config"]
    row = {"checkpoint": ckpt, "quantization_config": qc, "runs": runs,
           "tp2_vs_tp1": compare(tok["widened_tp1"], tok["widened_tp2"])}
    if not skip:
        row["widened_tp1_vs_original_tp1"] = compare(tok["original_tp1"], tok["widened_tp1"])
    print(json.dumps({k: v for k, v in row.items() if k != "runs"}, indent=1))
    result["rows"] = [r for r in result["rows"] if r["checkpoint"] != ckpt] + [row]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2])
