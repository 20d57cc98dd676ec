"""Perplexity on held-out windows (the WikiText-2 protocol: non-overlapping windows, mean NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4, desc: str = "perplexity") -> float:
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch), desc=desc, leave=False):
        ids = windows[i:i + batch]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
