"""SPEC §7: write the checkpoint vLLM serves (and `load_fake_quant_model` rebuilds)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from safetensors.torch import save_file

from ostquant_vllm.format import QuantFormat, validate_checkpoint
from ostquant_vllm.numerics import pack_int4

log = logging.getLogger(__name__)
STORE_DTYPE = torch.bfloat16   # every tensor that is not a quantized linear


def export_checkpoint(model, qweights: dict, fmt: QuantFormat, out_dir: str, tokenizer=None,
                      report: dict | None = None) -> str:
    """Write config.json (with quantization_config), model.safetensors, tokenizer, report; validate it.

    qweights: {linear module name: (levels int8 [out, in], scale fp16 [out] or [out, groups])}.
    The folder is written under a temporary name and renamed at the end, so an interrupted
    export never leaves a folder that looks complete.
    """
    fmt.validate()
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in qweights:
            state[name] = p.detach().to(STORE_DTYPE).cpu().contiguous()
    for name, (q, scale) in qweights.items():
        state[f"{name}.qweight"] = pack_int4(q.cpu()).contiguous()
        state[f"{name}.weight_scale"] = scale.to(torch.float16).cpu().contiguous()
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("_attn_implementation", None)
    config.update({"tie_word_embeddings": False, "dtype": "bfloat16", "torch_dtype": "bfloat16",
                   "quantization_config": fmt.to_dict()})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if report is not None:
        with open(os.path.join(tmp, "ostquant_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    validate_checkpoint(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("exported %s (%d quantized linears)", out_dir, len(qweights))
    return out_dir
