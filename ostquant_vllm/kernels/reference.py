"""PyTorch reference of the two kernels: the fallback on anything that is not Hopper, and what
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


def int4_gemm_ref(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype=torch.bfloat16):
    """out = a_scale[m] * w_scale[n] * (a_q[m] . w[n] - a_zero[m] * w_sum[n]), in float64."""
    wl = weight_levels(w).to(a_q.device)
    acc = a_q.reshape(-1, a_q.shape[-1]).double() @ wl.double().T
    s = a_scale.reshape(-1, 1).double() * w_scale.reshape(1, -1).double()
    out = s * (acc - a_zero.reshape(-1, 1).double() * w_sum.reshape(1, -1).double())
    return out.to(out_dtype).reshape(*a_q.shape[:-1], wl.shape[0])
