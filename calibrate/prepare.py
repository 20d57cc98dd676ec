"""SPEC §2: make the model ready for exact equivalence transforms, before any transform.

1. untie lm_head from the embedding; 2. fold every RMSNorm weight into the linears that read
it and set it to 1 (RMSNorm with unit weight commutes with any rotation); 3. float32.
"""
from __future__ import annotations

import torch
from torch import nn


def layer_modules(model):
    """Per decoder layer: (attention, mlp, input norm, post-attention norm)."""
    return [(l.self_attn, l.mlp, l.input_layernorm, l.post_attention_layernorm) for l in model.model.layers]


def untie_lm_head(model) -> None:
    emb, head = model.model.embed_tokens, model.lm_head
    if head.weight.data_ptr() == emb.weight.data_ptr() or head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []  # transformers must not re-tie them on save/load
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.tie_word_embeddings = False


@torch.no_grad()
def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gamma = norm.weight.double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * gamma).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def fold_norms(model) -> None:
    for attn, mlp, ln_in, ln_post in layer_modules(model):
        _fold(ln_in, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold(ln_post, [mlp.gate_proj, mlp.up_proj])
    _fold(model.model.norm, [model.lm_head])


def prepare(model, dtype=torch.float32):
    """In place: untie, fold norms, cast. Returns the model."""
    model.to(dtype)
    untie_lm_head(model)
    fold_norms(model)
    return model
