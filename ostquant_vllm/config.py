"""vLLM QuantizationConfig "ostquant": reads SPEC §7's quantization_config, hands out the methods."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from . import compat
from .format import QUANT_METHOD, QUANTIZED_LINEARS, CheckpointError, QuantFormat, validate_checkpoint

logger = logging.getLogger("vllm.ostquant")  # under vLLM's logger: its handler, level and format

DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class OstQuantConfig(QuantizationConfig):
    """W4 (int4 per channel / group) x A4/A8/A16 (per token, dynamic) x KV4/KV16 (vLLM's int4 cache)."""

    def __init__(self, fmt: QuantFormat):
        super().__init__()
        self.fmt = fmt
        self.model_dir: str | None = None

    def __repr__(self) -> str:
        return f"OstQuantConfig({self.fmt})"

    # ---------------------------------------------------------------- vLLM API
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the reference path runs anywhere torch does; the fast kernels want sm_90

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "OstQuantConfig":
        fmt = QuantFormat.from_dict(dict(config))
        if fmt.kv_bits == 8:
            raise CheckpointError("quantization_config.kv_bits=8: an 8-bit KV cache is a calibration-only "
                                  "ablation; vLLM serves kv_bits 4 (int4_per_token_head) or 16")
        return cls(fmt)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, *args, **kwargs):
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            if user_quant in (None, QUANT_METHOD):
                return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        """Called by vLLM with the model path once the config is known: validate a local checkpoint."""
        if isinstance(model_name, str) and os.path.isdir(model_name):
            self.model_dir = model_name
            if any(f.endswith(".safetensors") for f in os.listdir(model_name)):
                validate_checkpoint(model_name, hf_config)
            else:  # load_format="dummy" folders hold config.json only; a real load fails in vLLM
                logger.info("ostquant: %s has no .safetensors files; tensor checks skipped", model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        L = compat.linear_classes()
        if isinstance(layer, compat.attention_class()):
            from . import kv_cpu

            kv_cpu.install(layer, self.fmt, prefix)
            return None
        if isinstance(layer, L.LinearBase):
            names = self.checkpoint_names(prefix)
            quantized = all(n.rsplit(".", 1)[-1] in QUANTIZED_LINEARS for n in names)
            if not quantized or self.is_ignored(prefix, names):
                return L.UnquantizedLinearMethod()
            from . import fusion
            from .linear import OstQuantLinearMethod

            fusion.install(compat.current_vllm_config(), self.fmt)  # RMSNorm + quantize: one kernel (CUDA)
            return OstQuantLinearMethod(self.fmt, prefix, names)
        return None  # lm_head / embeddings: unquantized

    # ---------------------------------------------------------------- helpers
    def checkpoint_names(self, prefix: str) -> list[str]:
        """vLLM module name -> the checkpoint module name of each of its shards."""
        head, _, last = prefix.rpartition(".")
        mapping = {**DEFAULT_PACKED, **(self.packed_modules_mapping or {})}
        parts = mapping.get(last, [last])
        return [f"{head}.{p}" if head else p for p in parts]

    def is_ignored(self, prefix: str, names: list[str]) -> bool:
        for ig in self.fmt.ignore:
            for n in [prefix, *names]:
                if n == ig or n.endswith("." + ig):
                    return True
        return False
