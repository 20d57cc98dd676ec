"""Every bad-checkpoint case gives its clear error through the plugin's config-time check
(OstQuantConfig.maybe_update_config, which vLLM calls with the model path)."""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from ostquant_vllm.format import CheckpointError  # noqa: E402


@pytest.fixture
def ckpt(tiny_ckpts, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpts["w4a4kv4"], d)
    return str(d)


def check(d):
    from transformers import AutoConfig

    from ostquant_vllm.config import OstQuantConfig

    cfg = json.load(open(os.path.join(d, "config.json")))
    qc = OstQuantConfig.from_config(cfg["quantization_config"])
    qc.maybe_update_config(d, hf_config=AutoConfig.from_pretrained(d))
    return qc


def edit(d, fn):
    from safetensors.torch import load_file, save_file

    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    fn(sd)
    save_file(sd, p, metadata={"format": "pt"})


def test_good(ckpt):
    assert check(ckpt).model_dir == ckpt


def test_missing(ckpt):
    edit(ckpt, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.qweight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.qweight is missing"):
        check(ckpt)


def test_extra(ckpt):
    edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.extra_proj.qweight", torch.zeros(4, 4, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra_proj\.qweight"):
        check(ckpt)


def test_misshaped(ckpt):
    edit(ckpt, lambda sd: sd.__setitem__("model.layers.1.mlp.down_proj.qweight",
                                         sd["model.layers.1.mlp.down_proj.qweight"][:, :-2].contiguous()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.qweight has shape \[128, 94\]"):
        check(ckpt)


def test_wrong_dtype(ckpt):
    edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.gate_proj.weight_scale",
                                         sd["model.layers.0.mlp.gate_proj.weight_scale"].float()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight_scale .*dtype F32"):
        check(ckpt)


def test_unknown_version(ckpt):
    p = os.path.join(ckpt, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"]["format_version"] = 99
    json.dump(cfg, open(p, "w"))
    with pytest.raises(CheckpointError, match="format_version=99"):
        check(ckpt)


def test_truncated(ckpt):
    p = os.path.join(ckpt, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|unreadable)"):
        check(ckpt)


def test_unquantized_copy(ckpt):
    edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(128, 256)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight is an unquantized copy"):
        check(ckpt)
