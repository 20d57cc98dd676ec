"""vLLM offline LLM(...) end to end on the CPU with the plugin (tiny exported checkpoints):
agreement with the fake-quant reference, the plugin's code really ran, bf16, dummy weights,
auto-detection, and a bad checkpoint failing at load with the tensor's name."""
import contextlib
import gc
import os

import pytest
import torch

pytest.importorskip("vllm")

from conftest import REAL_TEXT_PROMPTS, agreement, tiny_reference  # noqa: E402


@contextlib.contextmanager
def vllm_llm(model, **kw):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    kw.setdefault("enforce_eager", True)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("seed", 0)
    llm = LLM(model=model, **kw)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.mark.parametrize("preset", ["w4a4kv4", "w4a8kv4", "w4a16", "w4a4kv16"])
def test_tiny_agreement_and_plugin_ran(tiny_ckpts, preset):
    from ostquant_vllm import ops

    ckpt = tiny_ckpts[preset]
    before = dict(ops.CALLS)
    # no quantization= flag for half of them: picked up from config.json
    flag = {"quantization": "ostquant"} if preset in ("w4a4kv4", "w4a16") else {}
    with vllm_llm(ckpt, dtype="float32", **flag) as llm:
        res = agreement(llm, tiny_reference(ckpt, torch.float32), REAL_TEXT_PROMPTS[:8], 32)
    ran = {k: ops.CALLS[k] - before.get(k, 0) for k in ("reference_int", "dequant", "kv4_emulated")}
    path = "dequant" if preset == "w4a16" else "reference_int"
    # 2 layers x (qkv, o, gate_up, down) = 8 linear calls per forward, >= 32 forwards
    assert ran[path] >= 8 * 32, ran
    assert (ran["kv4_emulated"] > 0) == preset.endswith("kv4"), ran
    # a random tiny model has near-tied logits: fp32 round-off may flip a rare token
    assert res["token_agreement"] >= 0.95, res
    assert res["first_logprob_max_diff"] < 0.05, res  # a rare level flip moves it ~1e-2


def test_bf16_runs(tiny_ckpts):
    from vllm import SamplingParams

    ckpt = tiny_ckpts["w4a4kv4"]
    with vllm_llm(ckpt, dtype="bfloat16", quantization="ostquant") as llm:
        out = llm.generate(REAL_TEXT_PROMPTS[:4], SamplingParams(max_tokens=16, temperature=0, logprobs=1),
                           use_tqdm=False)
    ref = tiny_reference(ckpt, torch.bfloat16)
    for o in out:
        assert len(o.outputs[0].token_ids) == 16
        assert all(torch.isfinite(torch.tensor(next(iter(lp.values())).logprob)) for lp in o.outputs[0].logprobs)
    # bf16 rounding flips some 4-bit levels: only a loose check against the bf16 reference
    ids = torch.tensor([out[0].prompt_token_ids])
    with torch.no_grad():
        lp = ref(ids).logits[0, -1].float().log_softmax(-1)
    tid, v = next(iter(out[0].outputs[0].logprobs[0].items()))
    assert abs(v.logprob - lp[tid].item()) < 0.5


def test_dummy_load_finite(tiny_ckpts, tmp_path):
    import json
    import shutil

    from vllm import SamplingParams

    src = tiny_ckpts["w4a4kv4"]
    d = tmp_path / "dummy"
    d.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), d)
    assert "quantization_config" in json.load(open(d / "config.json"))
    with vllm_llm(str(d), dtype="float32", load_format="dummy") as llm:
        out = llm.generate(REAL_TEXT_PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0, logprobs=1),
                           use_tqdm=False)
    for o in out:
        assert len(o.outputs[0].token_ids) == 8
        for lp in o.outputs[0].logprobs:
            assert all(torch.isfinite(torch.tensor(v.logprob)) for v in lp.values())


def test_bad_checkpoint_fails_at_load(tiny_ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    from ostquant_vllm.format import CheckpointError
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(tiny_ckpts["w4a4kv4"], d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception) as ei:
        with vllm_llm(str(d), dtype="float32"):
            pass
    msg = "".join(f"{type(e).__name__}: {e}" for e in _chain(ei.value))
    assert "model.layers.1.mlp.up_proj.weight_scale is missing" in msg
    # vLLM wraps config-time errors in a pydantic ValidationError ("Value error, <ours>")
    assert isinstance(ei.value, CheckpointError) or "Value error" in msg


def test_loader_counts_tensors(tiny_ckpts, tmp_path, monkeypatch):
    """With the config-time check off, the weight loaders' count still names the missing tensor."""
    from safetensors.torch import load_file, save_file
    import shutil

    import ostquant_vllm.config

    monkeypatch.setattr(ostquant_vllm.config, "validate_checkpoint", lambda *a, **k: None)
    d = tmp_path / "bad2"
    shutil.copytree(tiny_ckpts["w4a4kv4"], d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.0.self_attn.v_proj.qweight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception) as ei:
        with vllm_llm(str(d), dtype="float32"):
            pass
    msg = "".join(f"{type(e).__name__}: {e}" for e in _chain(ei.value))
    assert "model.layers.0.self_attn.v_proj.qweight is missing" in msg, msg


def _chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__
