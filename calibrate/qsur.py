"""SPEC §6: quantization space utilisation rate, reported as log10(QSUR)/d.

QSUR = V_ellipsoid / V_cube: the alpha-confidence ellipsoid of the data (mean mu, covariance
Sigma = Q Lambda Q^T) against the smallest axis-aligned cube symmetric about 0 that holds it.
"""
from __future__ import annotations

import math

import torch
from scipy.stats import chi2

ALPHA = 0.99


def log10_qsur_per_dim(x: torch.Tensor, alpha: float = ALPHA) -> float | None:
    """x: [n, d] samples (activation rows, or weight rows). Returns log10(QSUR) / d, or None when
    n <= d (the covariance is singular and the ellipsoid has no volume)."""
    x = x.reshape(-1, x.shape[-1]).double()
    n, d = x.shape
    if n <= d:
        return None
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(n - 1, 1)
    lam = torch.linalg.eigvalsh(cov).clamp_min(1e-30)
    c = chi2.ppf(alpha, d)
    log_ve = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1) + (d / 2) * math.log(c) + 0.5 * lam.log().sum().item()
    half_side = (mu.abs() + (c * torch.diagonal(cov)).sqrt()).max().item()
    log_vc = d * math.log(2 * half_side)
    return (log_ve - log_vc) / math.log(10) / d


# The tensors whose QSUR is reported, per layer: the input of each quantized activation site.
_SITES = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "ffn_in": "mlp.gate_proj", "down_in": "mlp.down_proj"}


@torch.no_grad()
def model_qsur(model, windows: torch.Tensor, settings, max_tokens: int = 2048) -> list[dict]:
    """Per layer: log10(QSUR)/d of the activations entering each quantizer (after any online
    Hadamard, quantization off) and of each quantized weight."""
    from .qmodel import quant_disabled

    layers = model.model.layers
    acts: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(layers):
        for site, path in _SITES.items():
            mod = layer.get_submodule(path)

            def hook(m, args, key=(i, site)):
                x = args[0].detach()
                x = m.rotate_input(x) if hasattr(m, "rotate_input") else x
                have = sum(t.shape[0] for t in acts.get(key, []))
                if have < max_tokens:
                    acts.setdefault(key, []).append(x.reshape(-1, x.shape[-1])[: max_tokens - have].double())
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with quant_disabled(settings):
            for w in windows:
                model(w[None], use_cache=False)
                if all(sum(t.shape[0] for t in v) >= max_tokens for v in acts.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, layer in enumerate(layers):
        row = {site: log10_qsur_per_dim(torch.cat(acts[(i, site)])) for site in _SITES}
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            row["w_" + path.split(".")[1]] = log10_qsur_per_dim(layer.get_submodule(path).weight.detach())
        out.append(row)
    return out
