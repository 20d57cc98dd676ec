"""The ostquant checkpoint format (SPEC §7): its quantization_config and the tensors it holds.

Shared by the exporter (calibrate/export.py), the validating loader and the vLLM plugin, so
all three agree on every field. Pure Python + safetensors: importable without vLLM.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1
QUANT_METHOD = "ostquant"
# The decoder linears that are quantized (SPEC §4); everything else stays bf16.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint or quantization_config that does not fit the format; the message names the culprit."""


@dataclass
class QuantFormat:
    weight_bits: int = 4
    weight_group_size: int = -1          # -1: one scale per output channel
    act_bits: int = 4                    # 16: weight-only
    act_sym: bool = False
    act_clip: float = 1.0
    kv_bits: int = 4                     # 16: no KV quantization; 4: vLLM's int4_per_token_head
    kv_group_size: int = -1              # -1: one group per head (head_dim)
    online_hadamard: dict = field(default_factory=lambda: {"down_proj": True, "qk": True})
    hadamard_blocks: int = 1             # down_proj Hadamard = I_blocks (x) H_{m/blocks} (TP-friendly when > 1)
    ignore: list = field(default_factory=lambda: ["lm_head"])
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    @classmethod
    def from_dict(cls, d: dict) -> "QuantFormat":
        if not isinstance(d, dict):
            raise CheckpointError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method={d.get('quant_method')!r}: expected {QUANT_METHOD!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"quantization_config.format_version={d.get('format_version')!r}: this ostquant "
                                  f"reads format version {FORMAT_VERSION} only")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"quantization_config has unknown field(s) {unknown}")
        fmt = cls(**d)
        fmt.validate()
        return fmt

    def validate(self) -> None:
        def bad(name, why):
            raise CheckpointError(f"quantization_config.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            bad("weight_bits", "must be an integer from 2 to 8")
        if self.weight_bits != 4:
            bad("weight_bits", "only 4-bit weights can be packed in this format version")
        if not isinstance(self.weight_group_size, int) or not (self.weight_group_size == -1 or self.weight_group_size > 0):
            bad("weight_group_size", "must be -1 (per channel) or a positive group size")
        if self.act_bits not in (4, 8, 16):
            bad("act_bits", "must be 4, 8 or 16")
        if not isinstance(self.act_sym, bool):
            bad("act_sym", "must be true or false")
        if not isinstance(self.act_clip, (int, float)) or not 0 < self.act_clip <= 1:
            bad("act_clip", "must be in (0, 1]")
        if self.kv_bits not in (4, 8, 16):
            bad("kv_bits", "must be 4, 8 or 16")
        if self.kv_group_size != -1:
            bad("kv_group_size", "only -1 (one group per head) is supported")
        oh = self.online_hadamard
        if not isinstance(oh, dict) or set(oh) != {"down_proj", "qk"} or not all(isinstance(v, bool) for v in oh.values()):
            bad("online_hadamard", 'must be {"down_proj": bool, "qk": bool}')
        if not isinstance(self.hadamard_blocks, int) or self.hadamard_blocks < 1:
            bad("hadamard_blocks", "must be a positive integer")
        if not isinstance(self.ignore, list):
            bad("ignore", "must be a list of module names")

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_linear_names(hf_config) -> list[str]:
    """Module names of the quantized linears of a Llama-family config, in model order."""
    names = []
    for i in range(hf_config.num_hidden_layers):
        for proj in QUANTIZED_LINEARS:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names.append(f"model.layers.{i}.{block}.{proj}")
    return names


def linear_shape(hf_config, name: str) -> tuple[int, int]:
    """[out, in] of a quantized linear."""
    d = hf_config.hidden_size
    h = getattr(hf_config, "head_dim", None) or d // hf_config.num_attention_heads
    q_out = hf_config.num_attention_heads * h
    kv_out = hf_config.num_key_value_heads * h
    m = hf_config.intermediate_size
    proj = name.rsplit(".", 1)[-1]
    return {"q_proj": (q_out, d), "k_proj": (kv_out, d), "v_proj": (kv_out, d), "o_proj": (d, q_out),
            "gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)}[proj]


def quantized_tensor_specs(hf_config, fmt: QuantFormat) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} of every quantized tensor the checkpoint must hold."""
    specs = {}
    for name in quantized_linear_names(hf_config):
        out, inp = linear_shape(hf_config, name)
        specs[f"{name}.qweight"] = ((out, inp // 2), "I8")
        if fmt.weight_group_size > 0:
            if inp % fmt.weight_group_size:
                raise CheckpointError(f"{name}: in_features {inp} is not a multiple of weight_group_size "
                                      f"{fmt.weight_group_size}")
            specs[f"{name}.weight_scale"] = ((out, inp // fmt.weight_group_size), "F16")
        else:
            specs[f"{name}.weight_scale"] = ((out,), "F16")
    return specs


def read_quant_format(model_dir: str) -> QuantFormat:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {model_dir!r} an ostquant checkpoint folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{path}: no quantization_config (not an ostquant checkpoint)")
    return QuantFormat.from_dict(cfg["quantization_config"])


def validate_checkpoint(model_dir: str, hf_config=None) -> QuantFormat:
    """Check config.json and every safetensors header against the format without loading tensors.

    Raises CheckpointError naming the first field or tensor that does not fit: a missing, extra,
    mis-shaped or mis-typed quantized tensor, a truncated or corrupt safetensors file.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    fmt = read_quant_format(model_dir)
    hf_config = hf_config or AutoConfig.from_pretrained(model_dir)
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no .safetensors files")
    found: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for fname in files:
        path = os.path.join(model_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype(), fname)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        _check_file_size(path)
    specs = quantized_tensor_specs(hf_config, fmt)
    for key, (shape, dtype) in specs.items():
        if key not in found:
            raise CheckpointError(f"{model_dir}: tensor {key} is missing")
        got_shape, got_dtype, fname = found[key]
        if got_shape != shape or got_dtype != dtype:
            raise CheckpointError(f"{fname}: tensor {key} has shape {list(got_shape)} dtype {got_dtype}, "
                                  f"expected shape {list(shape)} dtype {dtype}")
    for key, (_, _, fname) in found.items():
        stem = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and stem.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
            raise CheckpointError(f"{fname}: tensor {key} is an unquantized copy of a quantized linear")
        if key.endswith((".qweight", ".weight_scale")) and key not in specs:
            raise CheckpointError(f"{fname}: unexpected tensor {key}")
    return fmt


def _check_file_size(path: str) -> None:
    """A truncated file still has a readable header: compare the data length it promises."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    if size != 8 + n + end:
        raise CheckpointError(f"{path}: file is {size} bytes, its header promises {8 + n + end} (truncated or padded)")
