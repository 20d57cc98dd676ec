"""The quantizers' arithmetic (SPEC §4, §7, §8), written once.

Calibration's fake quantizers, the exporter, the plugin's PyTorch reference path and the
CUDA kernels' tests all use these functions, so the calibrated model is the served model.
Pure PyTorch: importable without vLLM.
"""
from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


# ---------------------------------------------------------------------------------------------
# int4 packing (SPEC §7): two signed 4-bit values a byte, low nibble = even column.
# ---------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] with values in [-8, 7] -> int8 [..., K/2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """int8 [..., K/2] -> int8 [..., K] in [-8, 7] (sign-extended nibbles)."""
    u = p.view(torch.uint8).to(torch.int16)
    lo, hi = u & 0xF, u >> 4
    q = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return (q - ((q & 0x8) << 1)).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# Weights: symmetric, per output channel (or per group), levels [-2^(b-1), 2^(b-1)-1].
# ---------------------------------------------------------------------------------------------
def weight_scale(w: torch.Tensor, bits: int, group_size: int = -1, mse: bool = True,
                 grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> torch.Tensor:
    """Scale per row (group_size -1) or per (row, group): absmax / qmax, shrunk by an MSE search.

    Returns [out] or [out, in/group] float32. The search follows the official code: try
    p = 1, 0.99, ... down to 1 - max_shrink, keep the p with the least sum |q(w) - w|^norm per row.
    """
    wg = _grouped(w.float(), group_size)
    qmax = 2 ** (bits - 1) - 1
    absmax = wg.abs().amax(-1).clamp_min(1e-8)
    best_scale = absmax / qmax
    if mse:
        best_err = torch.full_like(absmax, float("inf"))
        for i in range(int(max_shrink * grid)):
            scale = (1 - i / grid) * absmax / qmax
            q = torch.clamp(torch.round(wg / scale[..., None]), -qmax - 1, qmax)
            err = (q * scale[..., None] - wg).abs().pow(norm).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale if group_size > 0 else best_scale[..., 0]


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group] (one group of size in when group_size is -1)."""
    g = w.shape[-1] if group_size <= 0 else group_size
    if w.shape[-1] % g:
        raise ValueError(f"in_features {w.shape[-1]} is not a multiple of group size {g}")
    return w.reshape(w.shape[0], w.shape[-1] // g, g)


def _expand_scale(scale: torch.Tensor, w_shape, group_size: int) -> torch.Tensor:
    if group_size <= 0:
        return scale.reshape(-1, 1)
    return scale.repeat_interleave(group_size, dim=-1).reshape(w_shape)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Integer levels (int8 container) of w for the given scale."""
    qmax = 2 ** (bits - 1) - 1
    s = _expand_scale(scale.float(), w.shape, group_size)
    return torch.clamp(torch.round(w.float() / s), -qmax - 1, qmax).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    return q.float() * _expand_scale(scale.float(), q.shape, group_size)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int = -1, mse: bool = False) -> torch.Tensor:
    """Differentiable (STE) quantize-dequantize of a weight; scale from the weight itself."""
    if bits >= 16:
        return w
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        scale = weight_scale(w.detach(), bits, group_size, mse=mse)
    s = _expand_scale(scale, w.shape, group_size).to(w.dtype)
    return torch.clamp(round_ste(w / s), -qmax - 1, qmax) * s


# ---------------------------------------------------------------------------------------------
# Activations: per token, dynamic; asymmetric by default (official ActQuantizer).
# The integer path holds levels shifted to signed int8: q_s = q_u - 2^(b-1), z_s = z_u - 2^(b-1),
# so that x ~= scale * (q_s - z_s) and the int GEMM epilogue is scale*(acc - z_s * sum_k w).
# ---------------------------------------------------------------------------------------------
def act_qparams(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0):
    """(scale, zero) per row of x [..., K]; zero is in the unsigned level domain (0 when sym)."""
    xf = x.float()
    # Divide by a tensor on x's device: CUDA turns division by a Python number into a multiply
    # by its rounded reciprocal, which moves .5 ties and breaks CPU/GPU agreement.
    if sym:
        qmax = xf.new_tensor(2 ** (bits - 1) - 1)
        scale = (xf.abs().amax(-1, keepdim=True) * clip).clamp_min(1e-5) / qmax
        return scale, torch.zeros_like(scale)
    qmax = xf.new_tensor(2**bits - 1)
    xmin = xf.amin(-1, keepdim=True).clamp(max=0) * clip
    xmax = xf.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = (xmax - xmin).clamp_min(1e-5) / qmax
    return scale, torch.round(-xmin / scale)


def quantize_act(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0):
    """Integer path: (q int8 [..., K], scale fp32 [..., 1], zero fp32 [..., 1]) in the signed domain."""
    scale, zero = act_qparams(x, bits, sym, clip)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax)
        return q.to(torch.int8), scale, zero
    shift = 2 ** (bits - 1)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**bits - 1)
    return (q - shift).to(torch.int8), scale, zero - shift


def fake_quant_act(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0) -> torch.Tensor:
    """Differentiable quantize-dequantize, per token, in x's dtype: straight-through for round, and
    (as the official quantizer) true gradients through the scale, i.e. the row's min and max. That
    path is what tells the transforms to shrink the ranges; a detached scale leaves them no signal."""
    if bits >= 16:
        return x
    scale, zero = act_qparams(x, bits, sym, clip)
    scale, zero = scale.to(x.dtype), zero.detach().to(x.dtype)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale
    return (torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


# ---------------------------------------------------------------------------------------------
# KV cache: vLLM's `int4_per_token_head` (vllm/v1/attention/ops/int4_per_token_head.py, 0.26).
# On write: RHT = unnormalised Sylvester Hadamard of (signs * x), signs from a fixed-seed
# Bernoulli; rounded to the cache dtype; asymmetric 4 bits per (token, head), round half away
# from zero; the zero point (0..15) is hidden in the low 4 mantissa bits of the fp32 scale,
# and the reader uses the scale with those bits cleared. Q gets the same RHT, the output the
# inverse: together they are our H_qk (SPEC §3).
# ---------------------------------------------------------------------------------------------
_RHT_SIGNS: dict[int, torch.Tensor] = {}


def rht_signs(d: int) -> torch.Tensor:
    if d not in _RHT_SIGNS:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0x9E3779B9)  # round 0 of vLLM's _get_rht_signs
        _RHT_SIGNS[d] = 2.0 * torch.bernoulli(torch.full((d,), 0.5, device="cpu"), generator=gen) - 1.0
    return _RHT_SIGNS[d]


def _sylvester_fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim (H H = d I)."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the int4 KV cache needs a power-of-two head dim, got {d}")
    h = 1
    while h < d:
        xv = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        x = torch.stack([xv[..., 0, :] + xv[..., 1, :], xv[..., 0, :] - xv[..., 1, :]], dim=-2).reshape(x.shape)
        h *= 2
    return x


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's single_rht: H (D x) forward, (H x) D inverse; unnormalised (norm sqrt(d))."""
    signs = rht_signs(x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return _sylvester_fwht(x) * signs if inverse else _sylvester_fwht(x * signs)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def int4_kv_quantize(x_rot: torch.Tensor):
    """Cache write of already-rotated values [..., d] -> (levels 0..15 float, zero, read scale)."""
    xf = x_rot.float()
    scale = ((xf.amax(-1, keepdim=True) - xf.amin(-1, keepdim=True)) / xf.new_tensor(15.0)).clamp_min(1e-6)
    zero = torch.clamp(_round_half_away(-xf.amin(-1, keepdim=True) / scale), 0, 15)
    q = torch.clamp(_round_half_away(xf * (1.0 / scale) + zero), 0, 15)
    read_scale = (scale.view(torch.int32) & -16).view(torch.float32)
    return q, zero, read_scale


def fake_quant_kv_int4(x: torch.Tensor, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What attention sees of K or V [..., head_dim] after vLLM's int4 cache, in the original basis.

    Differentiable: straight-through for the rounding, exact gradients through the rotation.
    `cache_dtype` is the served dtype (bf16): the rotated values are rounded to it first.
    """
    d = x.shape[-1]
    y = rht(x.float())
    if cache_dtype is not None:
        y = y + (y.to(cache_dtype).float() - y).detach()
    q, zero, read_scale = int4_kv_quantize(y.detach())
    deq = (q - zero) * read_scale
    # Gradient surrogate: straight-through round, true gradient through the (max - min) / 15 scale;
    # its forward value is replaced by the exact cache numerics.
    scale = ((y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) / 15.0).clamp_min(1e-6)
    surrogate = (y / scale + (q - zero - y / scale).detach()) * scale
    y_fq = surrogate + (deq - surrogate).detach()
    return (rht(y_fq, inverse=True) / d).to(x.dtype)


def fake_quant_kv(x: torch.Tensor, bits: int, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """KV fake quantizer for the settings of SPEC §4: 16 = off, 4 = vLLM's int4 cache numerics,
    other bits = asymmetric per (token, head) after the same RHT."""
    if bits >= 16:
        return x
    if bits == 4:
        return fake_quant_kv_int4(x, cache_dtype)
    d = x.shape[-1]
    y = rht(x.float()) / d**0.5
    return (rht(fake_quant_act(y, bits), inverse=True) / d**0.5).to(x.dtype)
