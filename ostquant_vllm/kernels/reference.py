"""PyTorch reference of the kernels: the fallback on anything that is not Hopper, and what
the GPU tests compare against. The arithmetic itself lives in numerics.py / hadamard.py."""
from __future__ import annotations

import torch

from .. import numerics
from ..hadamard import apply_hadamard
from .layout import weight_levels


def quantize_act_ref(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, hadamard: int = 0):
    """(q int8 [..., K], scale fp32 [..., 1], zero fp32 [..., 1]): quantize_act(apply_hadamard(x.float(), b)),
    b = `hadamard` blocks (0: no Hadamard; True: 1)."""
    xf = x.float()
    if hadamard:
        xf = apply_hadamard(xf, int(hadamard))
    return numerics.quantize_act(xf, bits, sym=sym, clip=clip)


def rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float):
    """vLLM's rms_norm / fused_add_rms_norm (vllm/ir/ops/layernorm.py, 0.26-0.32): (y, x + residual or None)."""
    s = x.float()
    new_res = None
    if residual is not None:
        s = s + residual.float()
        new_res = s.to(x.dtype)
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y.to(weight.dtype) * weight
    return y.to(x.dtype), new_res


def rms_norm_quant_ref(x, residual, weight, eps: float, bits: int, sym: bool = False, clip: float = 1.0):
    """(q, scale, zero, x + residual or None): rms_norm_ref, then quantize_act of its bf16 output."""
    y, new_res = rms_norm_ref(x, residual, weight, eps)
    return (*numerics.quantize_act(y, bits, sym=sym, clip=clip), new_res)


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul on [..., 2d] = [gate | up] as Inductor compiles it: fp32 math, one rounding to gu's dtype."""
    g, u = gu.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gu.dtype)


def silu_mul_quantize_act_ref(gu: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, hadamard: int = 0):
    """quantize_act_ref of silu_mul_ref(gu)."""
    return quantize_act_ref(silu_mul_ref(gu), bits, sym, clip, hadamard)


def int4_gemm_ref(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype=torch.bfloat16):
    """out = a_scale[m] * w_scale[n] * (a_q[m] . w[n] - a_zero[m] * w_sum[n]), in float64."""
    wl = weight_levels(w).to(a_q.device)
    acc = a_q.reshape(-1, a_q.shape[-1]).double() @ wl.double().T
    s = a_scale.reshape(-1, 1).double() * w_scale.reshape(1, -1).double()
    out = s * (acc - a_zero.reshape(-1, 1).double() * w_sum.reshape(1, -1).double())
    return out.to(out_dtype).reshape(*a_q.shape[:-1], wl.shape[0])
