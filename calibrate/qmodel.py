"""The fake-quantized model: a transformers model whose linears and attention compute SPEC §4/§8.

- QuantLinear replaces nn.Linear in place (same parameter names, so torch.func.functional_call
  can feed it transformed weights during training): optional online (block-diagonal) Hadamard, per-token
  activation fake quantization, optional weight fake quantization.
- The attention function "ostquant_sdpa" fake-quantizes K (after RoPE) and V per head with the
  numerics of vLLM's int4 KV cache, then runs SDPA.
- `load_fake_quant_model(ckpt)` rebuilds from an exported checkpoint the exact model that
  calibration evaluated: the reference the vLLM plugin must match.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ostquant_vllm.format import QUANTIZED_LINEARS, QuantFormat, validate_checkpoint
from ostquant_vllm.hadamard import apply_hadamard
from ostquant_vllm.numerics import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_kv,
    fake_quant_weight,
    unpack_int4,
)
from ostquant_vllm.tensor_parallel import ROW_PARALLEL

ATTN_IMPL = "ostquant_sdpa"


@dataclass
class QuantSettings:
    """One object shared by every quantizer of a model; `enabled` switches them all."""
    w_bits: int = 16
    w_group: int = -1
    w_fake: bool = False           # weight fake quantization in forward (W4A16 training)
    a_bits: int = 16
    a_sym: bool = False
    a_clip: float = 1.0
    kv_bits: int = 16
    kv_cache_dtype: torch.dtype | None = None   # the served cache dtype (rotated K/V rounded to it)
    enabled: bool = True

    @classmethod
    def from_format(cls, fmt: QuantFormat, **kw) -> "QuantSettings":
        return cls(w_bits=fmt.weight_bits, w_group=fmt.weight_group_size, a_bits=fmt.act_bits,
                   a_sym=fmt.act_sym, a_clip=fmt.act_clip, kv_bits=fmt.kv_bits, **kw)


class QuantLinear(nn.Linear):
    """hadamard: 0 = none, b = the online x -> x (I_b (x) H_{in/b}) (down_proj's H_down), as the plugin.
    act_slices: the activation quantizer's scale is per token and per slice of in/act_slices inputs
    (1 in calibration; at tensor parallel size tp, vLLM's row-parallel layers quantize tp slices)."""

    def __init__(self, lin: nn.Linear, settings: QuantSettings, hadamard: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias
        self.settings, self.hadamard = settings, int(hadamard)
        self.act_slices = 1

    def rotate_input(self, x):
        return apply_hadamard(x, self.hadamard) if self.hadamard else x

    def forward(self, x):
        x = self.rotate_input(x)
        q = self.settings
        w = self.weight
        if q.enabled:
            if self.act_slices == 1:
                x = fake_quant_act(x, q.a_bits, q.a_sym, q.a_clip)
            else:
                x = torch.cat([fake_quant_act(c, q.a_bits, q.a_sym, q.a_clip) for c in x.chunk(self.act_slices, -1)], -1)
            if q.w_fake:
                w = fake_quant_weight(w, q.w_bits, q.w_group)
        return F.linear(x, w, self.bias)


def _ostquant_attention(module, query, key, value, attention_mask, **kwargs):
    q = getattr(module, "quant_settings", None)
    if q is not None and q.enabled and q.kv_bits < 16:
        key = fake_quant_kv(key, q.kv_bits, q.kv_cache_dtype)
        value = fake_quant_kv(value, q.kv_bits, q.kv_cache_dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _ostquant_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def quantize_model(model, settings: QuantSettings, had_down: int) -> QuantSettings:
    """In place: every decoder linear becomes a QuantLinear and attention fake-quantizes K/V.
    had_down: the online H_down of down_proj (0 = none, b = I_b (x) H_{m/b})."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in QUANTIZED_LINEARS:
                lin = getattr(parent, name, None)
                if lin is not None and not isinstance(lin, QuantLinear):
                    setattr(parent, name, QuantLinear(lin, settings, hadamard=had_down if name == "down_proj" else 0))
                elif isinstance(lin, QuantLinear):
                    lin.settings = settings
        layer.self_attn.quant_settings = settings
    model.config._attn_implementation = ATTN_IMPL
    return settings


@contextlib.contextmanager
def quant_disabled(settings: QuantSettings):
    prev, settings.enabled = settings.enabled, False
    try:
        yield
    finally:
        settings.enabled = prev


@torch.no_grad()
def set_quantized_weights(model, qweights: dict, group_size: int, keep_dtype: torch.dtype | None = None) -> None:
    """Write dequantized weights {module name: (levels int8 [out, in], scale fp16)} into the model.

    `keep_dtype`: round every other float tensor (embedding, norms, lm_head) to the dtype the
    checkpoint stores, so the in-memory model is the exported one."""
    modules = dict(model.named_modules())
    for name, (q, scale) in qweights.items():
        modules[name].weight.copy_(dequantize_weight(q, scale, group_size).to(modules[name].weight.dtype))
    if keep_dtype is not None:
        quantized = {f"{n}.weight" for n in qweights}
        for name, p in model.named_parameters():
            if name not in quantized:
                p.copy_(p.to(keep_dtype).to(p.dtype))


def load_fake_quant_model(ckpt_dir: str, dtype=torch.float32, kv_cache_dtype=torch.bfloat16,
                          tensor_parallel_size: int = 1):
    """The model calibration evaluated, rebuilt from an exported checkpoint (validated first).
    tensor_parallel_size > 1: the model vLLM serves at that TP degree instead, whose row-parallel
    o_proj and down_proj quantize each rank's slice of a token on its own (tensor_parallel.py)."""
    from safetensors.torch import load_file

    fmt = validate_checkpoint(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = {}
    for f in sorted(os.listdir(ckpt_dir)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(ckpt_dir, f)))
    qweights = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qweights[name] = (unpack_int4(state.pop(key)), state.pop(f"{name}.weight_scale"))
        state[f"{name}.weight"] = torch.empty(0)  # placeholder, filled below
    dense = {k: v for k, v in state.items() if v.numel()}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    missing = [k for k in missing if k[: -len(".weight")] not in qweights]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_quantized_weights(model, qweights, fmt.weight_group_size)
    settings = QuantSettings.from_format(fmt, kv_cache_dtype=kv_cache_dtype)
    quantize_model(model, settings, had_down=fmt.hadamard_blocks if fmt.online_hadamard["down_proj"] else 0)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and name.rsplit(".", 1)[-1] in ROW_PARALLEL:
            m.act_slices = tensor_parallel_size
    model.eval()
    model.ostquant_format = fmt
    return model
