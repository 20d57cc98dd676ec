"""Weight quantization after fusing (SPEC §4): RTN or GPTQ, per output channel (or group),
symmetric, MSE-searched clip. GPTQ runs layer by layer: each layer's Hessians come from the
inputs that the already-quantized layers before it produce (activation quantization off)."""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from ostquant_vllm.format import QUANTIZED_LINEARS
from ostquant_vllm.numerics import dequantize_weight, quantize_weight, weight_scale

from .qmodel import QuantLinear, QuantSettings, quant_disabled, set_quantized_weights

log = logging.getLogger(__name__)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored in float16 (SPEC §7): quantize against the stored value."""
    return scale.to(torch.float16).float()


def rtn(w: torch.Tensor, bits: int, group_size: int = -1, mse: bool = True):
    """(levels int8, scale fp16) by round-to-nearest."""
    scale = fp16_scale(weight_scale(w, bits, group_size, mse=mse))
    return quantize_weight(w, scale, bits, group_size), scale.to(torch.float16)


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, damp: float = 0.01,
         block: int = 128, act_order: bool = True, mse: bool = True):
    """(levels int8, scale fp16) by GPTQ (Frantar et al.) with the Hessian H = X^T X of the inputs."""
    W = w.double().clone()
    H = H.double().clone()
    n_in = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    # Scales are fixed up front from the whole weight (per channel), or per group as GPTQ reaches it.
    scale = fp16_scale(weight_scale(W, bits, -1, mse=mse)) if group_size <= 0 else None
    perm = (torch.argsort(torch.diag(H), descending=True) if act_order and group_size <= 0
            else torch.arange(n_in, device=H.device))
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    Q = torch.zeros_like(W)
    group_scales = []
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        W1, Err = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1])
        for j in range(b1 - b0):
            col = b0 + j
            if group_size > 0 and col % group_size == 0:
                gs = fp16_scale(weight_scale(W[:, col:col + group_size].float(), bits, -1, mse=mse)).double()
                group_scales.append(gs)
            s = scale.double() if group_size <= 0 else group_scales[-1]
            wcol = W1[:, j]
            q = torch.clamp(torch.round(wcol / s), -qmax - 1, qmax)
            Q[:, col] = q
            err = (wcol - q * s) / Hinv[col, col]
            W1[:, j:] -= err[:, None] * Hinv[col, col:b1][None, :]
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    inv = torch.argsort(perm)
    levels = Q[:, inv].to(torch.int8)
    if group_size > 0:
        scale = torch.stack(group_scales, dim=1)
    return levels, scale.to(torch.float16)


def _layer_linears(layer) -> dict[str, QuantLinear]:
    out = {}
    for parent, prefix in ((layer.self_attn, "self_attn"), (layer.mlp, "mlp")):
        for name in QUANTIZED_LINEARS:
            if hasattr(parent, name):
                out[f"{prefix}.{name}"] = getattr(parent, name)
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, windows: torch.Tensor, batch: int = 4):
    """Hidden states entering layer 0 and the keyword arguments the layers are called with."""
    layers = model.model.layers
    inputs, kwargs = [], {}
    first = layers[0]

    def grab(module, args, kw):
        inputs.append(kw.get("hidden_states", args[0] if args else None).detach())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    h = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch):
            try:
                model(windows[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return inputs, kwargs


@torch.no_grad()
def quantize_weights(model, settings: QuantSettings, windows: torch.Tensor | None, method: str = "gptq",
                     damp: float = 0.01, batch: int = 4) -> dict:
    """Quantize every decoder linear in place (weights replaced by their dequantized values).
    Returns {module name: (levels int8 [out, in], scale fp16)} for export."""
    bits, group = settings.w_bits, settings.w_group
    result = {}
    layers = model.model.layers
    if method == "rtn" or windows is None:
        for i, layer in enumerate(tqdm(layers, desc="RTN weights")):
            for name, lin in _layer_linears(layer).items():
                q, s = rtn(lin.weight.detach(), bits, group)
                result[f"model.layers.{i}.{name}"] = (q, s)
        set_quantized_weights(model, result, group)
        return result
    with quant_disabled(settings):
        hs, kw = capture_layer_inputs(model, windows, batch)
        for i, layer in enumerate(tqdm(layers, desc="GPTQ layers")):
            lins = _layer_linears(layer)
            hess = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float64, device=l.weight.device)
                    for n, l in lins.items()}
            count = [0]

            def hook(name):
                def f(module, args):
                    x = args[0].detach()
                    x = module.rotate_input(x)
                    x = x.reshape(-1, x.shape[-1]).double()
                    hess[name] += x.T @ x
                    if name == "self_attn.q_proj":
                        count[0] += x.shape[0]
                return f

            handles = [l.register_forward_pre_hook(hook(n)) for n, l in lins.items()]
            for x in hs:
                layer(x, **kw)
            for hnd in handles:
                hnd.remove()
            done = {}
            for name, lin in lins.items():
                H = 2 * hess[name] / max(count[0], 1)
                done[f"model.layers.{i}.{name}"] = gptq(lin.weight.detach(), H, bits, group, damp=damp)
            set_quantized_weights(model, done, group)
            result.update(done)
            hs = [_hidden(layer(x, **kw)) for x in hs]
    return result


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def weight_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, X: torch.Tensor, group: int = -1) -> float:
    """Relative output error ||X W^T - X Wq^T|| / ||X W^T|| of a quantized linear on inputs X."""
    ref = X @ w.float().T
    return ((X @ dequantize_weight(q, s, group).T - ref).norm() / ref.norm()).item()
