"""Loading a Llama-family model (SPEC §1) and refusing anything else by name."""
from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .assets import resolve_model

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedModelError(ValueError):
    pass


def check_architecture(config) -> str:
    archs = getattr(config, "architectures", None) or []
    arch = archs[0] if archs else type(config).__name__
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"architecture {arch} is not supported by ostquant; supported: {', '.join(SUPPORTED)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{arch} with hidden_act={config.hidden_act!r}: only SiLU MLPs are supported")
    if getattr(config, "attention_bias", False) and arch != "Qwen2ForCausalLM" or getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{arch} with attention/MLP biases other than Qwen2's q/k/v biases is not supported")
    return arch


def has_qk_norm(config) -> bool:
    """Qwen3 normalises q and k per head before RoPE: S_qk cannot be fused there (SPEC §1)."""
    return check_architecture(config) == "Qwen3ForCausalLM"


def load_model(name_or_path: str, dtype=torch.float32):
    """(model, tokenizer, local folder). Accepts a HF folder, a .gguf file or a known model name."""
    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path)
    arch = check_architecture(config)
    log.info("loading %s (%s, %d layers, hidden %d) in %s", path, arch, config.num_hidden_layers,
             config.hidden_size, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, path
