"""The one place that picks how a quantized linear is computed (SPEC §8).

`prepare_weights(...)` runs once after loading, `linear(...)` on every forward. Both choose
between the CUDA kernels of `ostquant_vllm.kernels` (sm_90, when importable and available)
and the plain-PyTorch reference path, which is what runs on the CPU and what the kernels are
tested against. Pure PyTorch; importable without vLLM.

Reference integer GEMM: activation levels (int8, |q| <= 128) and weight levels ([-8, 7]) are
small integers, so a float32 matmul of the integer-valued tensors is exact as long as every
partial sum stays below 2^24: |acc| <= K * 128 * 8 = 1024 K < 2^24 for K <= 16384 at 8-bit
activations (Llama-3-8B's down_proj has K = 14336). Larger K falls back to float64 (exact to
2^53). The epilogue is `out = a_scale[m] * w_scale[n] * (acc - a_zero[m] * w_sum[n])`.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import torch

from .hadamard import apply_hadamard
from .numerics import quantize_act, unpack_int4

# Counts of the paths taken, by name: tests read them to prove the plugin really ran
# (and that a silent fallback did not), e.g. CALLS["reference_int"]. Forward calls are counted in
# eager mode only (a compiled graph has no Python side effects); every layer also counts the path
# it prepared at load ("prepared_kernel", ...), which holds under torch.compile / CUDA graphs too.
CALLS: collections.Counter = collections.Counter()


def count(path: str) -> None:
    if not torch.compiler.is_compiling():  # a Python side effect must not enter a traced graph
        CALLS[path] += 1

FP32_EXACT_LIMIT = 2**24


@functools.lru_cache(maxsize=1)
def _kernels():
    """The CUDA kernels module when it imports and says it is usable here, else None."""
    try:
        from . import kernels  # noqa: F401  (written separately; absent on CPU-only installs)
    except Exception:
        return None
    try:
        return kernels if kernels.available() else None
    except Exception:
        return None


def kernels_usable(device: torch.device, weight_group_size: int, act_bits: int) -> bool:
    """Whether the CUDA kernels take this layer: CUDA tensors, per-channel scales, 4/8-bit acts."""
    return (device.type == "cuda" and weight_group_size <= 0 and act_bits in (4, 8)
            and _kernels() is not None)


@dataclass
class Prepared:
    """What the GEMM needs, computed once after loading."""
    path: str                      # "kernel" | "reference_int" | "dequant"
    w_scale: torch.Tensor          # fp32 [N] or [N, G]
    w_sum: torch.Tensor | None     # sum over k of the weight levels: kernel int32 [N], else fp32 [N] or [N, G]
    weight: torch.Tensor           # kernel: kernels.prepare_weight(qweight);
                                   # reference_int: fp32 levels [K, N] (or [G, gs, N]);
                                   # dequant: dequantized weight [N, K] in the model dtype
    group_size: int                # -1: per channel
    in_features: int


def prepare_weights(qweight: torch.Tensor, weight_scale: torch.Tensor, act_bits: int,
                    group_size: int, dtype: torch.dtype) -> Prepared:
    """qweight int8 [N, K/2] (two nibbles a byte), weight_scale fp16 [N] or [N, K/group]."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    levels = unpack_int4(qweight)                               # int8 [N, K]
    w_scale = weight_scale.float()
    gs = group_size if group_size > 0 else -1
    if act_bits >= 16:
        if gs > 0:
            s = w_scale.repeat_interleave(gs, dim=1)
        else:
            s = w_scale[:, None]
        w = (levels.float() * s).to(dtype)
        return Prepared("dequant", w_scale, None, w, gs, k)
    if kernels_usable(qweight.device, gs, act_bits):
        w_sum = levels.sum(1, dtype=torch.int32)                # the kernel's epilogue type: no per-call cast
        return Prepared("kernel", w_scale, w_sum, _kernels().prepare_weight(qweight), gs, k)
    if gs > 0:
        g = k // gs
        lv = levels.float().view(n, g, gs)                      # [N, G, gs]
        w_sum = lv.sum(-1)                                      # [N, G]
        w = lv.permute(1, 2, 0).contiguous()                    # [G, gs, N]
    else:
        w_sum = levels.float().sum(1)                           # [N]
        w = levels.float().t().contiguous()                     # [K, N]
    return Prepared("reference_int", w_scale, w_sum, w, gs, k)


def hadamard_input(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ (I_blocks (x) H_{K/blocks}) in float32 (down_proj's online H_down)."""
    return apply_hadamard(x.float(), blocks)


def linear(x: torch.Tensor, p: Prepared, act_bits: int, act_sym: bool, act_clip: float,
           hadamard_blocks: int = 0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T with W the int4 weight. hadamard_blocks > 0: apply H_down to x first.
    Traceable by torch.compile (vLLM compiles the model and replays it in CUDA graphs): the kernel
    path calls the registered custom ops directly."""
    out_dtype = x.dtype
    if p.path == "dequant":
        count("dequant")
        if hadamard_blocks:
            x = hadamard_input(x, hadamard_blocks).to(out_dtype)
        return torch.nn.functional.linear(x, p.weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if p.path == "kernel":
        count("kernel")
        # torch.ops.ostquant.* are registered by ostquant_vllm.kernels (imported by prepare_weights);
        # quantize_act fuses H_down (I_b (x) H_{K/b}, b = hadamard_blocks; 0: none)
        q, a_scale, a_zero = torch.ops.ostquant.quantize_act(x2, act_bits, act_sym, act_clip, hadamard_blocks)
        gemm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch.ops.ostquant.int4_gemm(q, a_scale, a_zero, p.weight, p.w_scale, p.w_sum, gemm_dtype)
        y = y.to(out_dtype)
    else:
        count("reference_int")
        if hadamard_blocks:
            x2 = hadamard_input(x2, hadamard_blocks)
        q, a_scale, a_zero = quantize_act(x2, act_bits, act_sym, act_clip)
        y = int_gemm_reference(q, a_scale, a_zero, p, act_bits).to(out_dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


def int_gemm_reference(q: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                       p: Prepared, act_bits: int) -> torch.Tensor:
    """Exact integer GEMM + epilogue in float32. q int8 [M, K]; a_scale, a_zero fp32 [M, 1]."""
    k = q.shape[-1]
    k_acc = p.group_size if p.group_size > 0 else k
    # Largest |level| of the activations (signed domain) times the largest |weight level| (8).
    bound = k_acc * 2 ** (act_bits - 1) * 8
    acc_dtype = torch.float32 if bound < FP32_EXACT_LIMIT else torch.float64
    qa = q.to(acc_dtype)
    w = p.weight.to(acc_dtype)
    if p.group_size > 0:
        g = k // p.group_size
        acc = torch.bmm(qa.view(-1, g, p.group_size).transpose(0, 1), w)     # [G, M, N]
        corr = acc - a_zero.to(acc_dtype)[None] * p.w_sum.t().to(acc_dtype)[:, None, :]
        out = (corr * p.w_scale.t().to(acc_dtype)[:, None, :]).sum(0)        # [M, N]
        return (out * a_scale.to(acc_dtype)).float()
    acc = qa @ w                                                            # [M, N], exact
    out = (acc - a_zero.to(acc_dtype) * p.w_sum.to(acc_dtype)) * p.w_scale.to(acc_dtype)
    return (out * a_scale.to(acc_dtype)).float()
