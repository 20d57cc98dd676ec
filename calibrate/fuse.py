"""Fusing the learned pairs into the weights, once, in float64 (SPEC §5 "After training")."""
from __future__ import annotations

import torch

from .transforms import Transforms


def transformable_weights(model) -> dict[str, torch.Tensor]:
    """The float tensors the pairs act on: every parameter of the model, detached."""
    return {name: p.detach() for name, p in model.named_parameters()}


@torch.no_grad()
def fuse(model, transforms: Transforms) -> None:
    """In place: the model's weights become transforms.apply(weights) computed in float64."""
    fused = transforms.apply(transformable_weights(model), dtype=torch.float64)
    params = dict(model.named_parameters())
    for name, w in fused.items():
        params[name].copy_(w.to(params[name].dtype))
