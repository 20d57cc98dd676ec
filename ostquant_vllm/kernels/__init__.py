"""Hopper kernels of SPEC §8 with a PyTorch reference fallback everywhere else.

    available() -> bool
    prepare_weight(qweight [N, K/2] int8) -> prepared weight (do once at load time)
    quantize_act(x [..., K], bits, sym=False, clip=1.0, hadamard=0)   (hadamard: blocks of I_b (x) H_{K/b})
        -> (q int8 [..., K], scale fp32 [..., 1], zero fp32 [..., 1])      (numerics.quantize_act's shapes)
    rms_norm_quant(x [..., K], residual | None, weight [K] | None, eps, bits, sym=False, clip=1.0)
        -> (q, scale, zero, x + residual (bf16; empty when no residual))   (vLLM's RMSNorm, then quantize_act)
    silu_mul_quantize_act(gu [..., 2K], bits, sym, clip, hadamard)        (vLLM's SiluAndMul, then quantize_act)
        -> (q [..., K], scale, zero)
    int4_gemm(a_q [M, K], a_scale [M] | [M, 1], a_zero [M] | [M, 1], w_prepared, w_scale [N] fp32 | fp16,
              w_sum [N] int32 (fp32 accepted, converted per call), out_dtype=torch.bfloat16) -> [M, N]

All are torch.library custom ops (torch.ops.ostquant.<name>) with fake
implementations, so they trace under torch.compile and replay inside CUDA graphs. The CUDA path
is a plain shared library loaded with ctypes (build: python -m ostquant_vllm.kernels.build);
it launches on torch.cuda.current_stream(). OSTQUANT_DISABLE_KERNELS=1 forces the reference.
The split-K GEMM path and the split KV4 decode keep per-device counters (zeroed once, reset by the
kernel), so two of these kernels must not run concurrently on different streams of one device.

Inputs that cost nothing extra per call: a_scale / a_zero as quantize_act returns them (fp32),
w_scale fp32 or fp16, w_sum int32 (precompute at load: levels.sum(1, dtype=int32)).
CUDA path limits (else the PyTorch reference runs): bf16 input; plain quantize K <= 32768;
fused Hadamard K / blocks = 2^k * b with b in HAD_B, blocks a power of two, K <= 51200; RMSNorm + quantize K <= 16384;
SiluAndMul + quantize where silu_mul_quant_fusable; GEMM N % 16 == 0, K % 64 == 0
(the wgmma kernels need K % 128 == 0, else mma.sync tiles). Kernel choice: _auto_force.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from .. import hadamard as _had
from . import _lib
from .layout import layout_ok, prepare_weight, weight_shape  # noqa: F401  (re-exported)
from .reference import int4_gemm_ref, quantize_act_ref, rms_norm_quant_ref, silu_mul_quantize_act_ref

__all__ = ["available", "prepare_weight", "quantize_act", "rms_norm_quant", "silu_mul_quantize_act", "int4_gemm",
           "unavailable_reason"]

HAD_B = (1, 12, 20, 28, 36, 52, 60)  # small factors the fused kernel is built for (108, 140: reference)
_HAD_SMEM_MAX = 200 * 1024  # the fused Hadamard kernel holds a row in fp32 shared memory
_PLAIN_MAX_K = 32768


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def unavailable_reason() -> str | None:
    if os.environ.get("OSTQUANT_DISABLE_KERNELS", "0") not in ("", "0"):
        return "OSTQUANT_DISABLE_KERNELS is set"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _device_ok(torch.cuda.current_device()):
        return f"device capability {torch.cuda.get_device_capability()} is not 9.0 (Hopper)"
    if _lib.load() is None:
        return f"kernel library not loadable ({_lib.load_error()}); run python -m ostquant_vllm.kernels.build"
    return None


def available() -> bool:
    """True only on a CUDA sm_90 device with the kernel library loadable."""
    return unavailable_reason() is None


def _use_cuda(*ts: torch.Tensor) -> bool:
    if not all(t.is_cuda for t in ts):
        return False
    if os.environ.get("OSTQUANT_DISABLE_KERNELS", "0") not in ("", "0"):
        return False
    return _device_ok(ts[0].device.index or 0) and _lib.load() is not None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _stream(device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------------------------------------
# activation quantization
# ---------------------------------------------------------------------------------------------
_H_TABLES: dict = {}


# Fused-Hadamard kernel version (csrc ostq_quantize_act): 0 = automatic (version 4, the row in registers, where
# its butterflies stay within a warp; else version 3), 1 = version 2 (table in constant memory), 2 = version 3
# (row in shared memory, signs compiled in), 3 / 4 = version 4 with the larger / smaller rows a thread, 5 =
# version 5 (H_B on the tensor cores), 6 = version 4 with one a-row a thread (session 13; slower where it was
# meant to help, kernels_h100_hadamard.json), 8 = version 6 (session 21: blocks of at most 64 a-rows, each in one
# warp's registers after version 5's tensor-core H_B; K = 64 W B for W <= 16 warps).
HAD_VARIANT = int(os.environ.get("OSTQUANT_HAD_VARIANT", "0"))


def _had_auto_variant(m: int, b: int, log2p: int) -> int:
    """Blocks of 28 * 64 (Llama-3-8B's down_proj input in calibration's 8 blocks, and its TP slices): version 6,
    each block in one warp (kernels_h100_hadamard.json, session 22: 5.8 against the library's 6.3 us at M = 64,
    60 against 67 at 2048, 210 against 244 at 8192). Elsewhere the library's own choice: version 6 lost at the
    default model's 12 * 16 (3.3 against 2.8 us at M = 64), and at 70B's 28 * 128 it does not apply."""
    return 8 if b == 28 and log2p == 6 else 0


def _had_table(k: int, device: torch.device) -> tuple[int, int, torch.Tensor]:
    key = (k, str(device))
    if key not in _H_TABLES:
        p2, b = _had.factor(k)
        hb = _had.small_factor(k)
        if b > 1:  # the signs compiled into the library must be this construction's
            lib = _lib.load()
            for i in range(b):
                mask = sum(1 << j for j in range(b) if hb[i, j] < 0)
                if lib.ostq_hb_mask(b, i) != mask:
                    raise RuntimeError(f"kernel library's H_{b} differs from hadamard.small_factor: rebuild it")
        table = hb.to(torch.float32).contiguous().to(device)
        _H_TABLES[key] = (b, p2.bit_length() - 1, table)
    return _H_TABLES[key]


def _quant_kernel_ok(x: torch.Tensor, bits: int, hadamard: int) -> bool:
    k = x.shape[-1]
    if x.dtype != torch.bfloat16 or k % 8 or not 2 <= bits <= 8 or not _use_cuda(x):
        return False
    if not hadamard:
        return k <= _PLAIN_MAX_K
    if hadamard & (hadamard - 1) or k % hadamard:  # the kernel splits off power-of-two blocks only
        return False
    try:
        p2, b = _had.factor(k // hadamard)
    except ValueError:
        return False
    return b in HAD_B and k * 4 <= _HAD_SMEM_MAX


@torch.library.custom_op("ostquant::quantize_act", mutates_args=())
def _quantize_act_op(x: torch.Tensor, bits: int, sym: bool, clip: float,
                     hadamard: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _quant_kernel_ok(x, bits, hadamard):
        q, s, z = quantize_act_ref(x, bits, sym, clip, hadamard)
        return q.contiguous(), s.contiguous(), z.contiguous()
    q, s, z = _quant_cuda(x, bits, sym, clip, hadamard)
    shp = x.shape[:-1]
    k = x.shape[-1]
    return q.view(*shp, k), s.view(*shp, 1), z.view(*shp, 1)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t  # 16-B vector loads


def _quant_outputs(m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantizer's outputs for m rows of k: levels int8 [m, k], scale and zero fp32 [m, 1]."""
    return (torch.empty((m, k), dtype=torch.int8, device=device),
            torch.empty((m, 1), dtype=torch.float32, device=device),
            torch.empty((m, 1), dtype=torch.float32, device=device))


def _quant_cuda(x, bits, sym, clip, hadamard, out=None, variant=None):
    """Launch the CUDA quantizer on x [..., K] -> (q [M, K], scale [M, 1], zero [M, 1]);
    hadamard: 0, or the blocks b of I_b (x) H_{K/b} applied first. `out` (tests): preallocated (q, scale, zero)."""
    k = x.shape[-1]
    x2 = _aligned(x.reshape(-1, k))
    m = x2.shape[0]
    q, s, z = out if out is not None else _quant_outputs(m, k, x.device)
    if m:
        if hadamard:
            b, log2p, table = _had_table(k // hadamard, x.device)
        else:
            b, log2p, table = 1, 0, None
        if variant is None:
            variant = HAD_VARIANT or (_had_auto_variant(m, b, log2p) if hadamard else 0)
        rc = _lib.load().ostq_quantize_act(_ptr(x2), _ptr(q), _ptr(s), _ptr(z), m, k, bits, int(sym),
                                           float(clip), int(hadamard), b, log2p,
                                           _ptr(table) if table is not None else None,
                                           variant, _stream(x.device))
        _lib.check(rc, "quantize_act")
    return q, s, z


@_quantize_act_op.register_fake
def _(x, bits, sym, clip, hadamard):
    shp = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*shp, 1), dtype=torch.float32),
            x.new_empty((*shp, 1), dtype=torch.float32))


def quantize_act(x: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, hadamard: int = 0):
    """Per-token quantization of x [..., K], optionally after the Hadamard I_b (x) H_{K/b} with b = `hadamard`
    blocks (True: 1, the full H_K), in one kernel. Same result as
    numerics.quantize_act(hadamard.apply_hadamard(x.float(), b) if b else x, ...)."""
    return torch.ops.ostquant.quantize_act(x, int(bits), bool(sym), float(clip), int(hadamard))


_RMS_MAX_K = 16384


def _rms_quant_kernel_ok(x, residual, weight, bits) -> bool:
    k = x.shape[-1]
    return (x.dtype == torch.bfloat16 and k % 8 == 0 and k <= _RMS_MAX_K and 2 <= bits <= 8
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
            and (weight is None or (weight.dtype == x.dtype and tuple(weight.shape) == (k,)))
            and _use_cuda(x, *[t for t in (residual, weight) if t is not None]))


def _rms_quant_cuda(x, residual, weight, eps, bits, sym, clip, y_out=None, out=None):
    """Launch the fused RMSNorm + quantizer on x [..., K] -> (q [M, K], scale [M, 1], zero [M, 1], x + residual
    [M, K] or empty). Tests: y_out, a bf16 [M, K] that receives the normalized rows; out, the four preallocated."""
    k = x.shape[-1]
    x2 = _aligned(x.reshape(-1, k))
    r2 = _aligned(residual.reshape(-1, k)) if residual is not None else None
    w = _aligned(weight) if weight is not None else None
    m = x2.shape[0]
    if out is None:
        q, s, z = _quant_outputs(m, k, x.device)
        ro = torch.empty_like(x2) if r2 is not None else x2.new_empty(0)
    else:
        q, s, z, ro = out
    if m:
        rc = _lib.load().ostq_rms_norm_quant(_ptr(x2), _ptr(r2) if r2 is not None else None,
                                             _ptr(w) if w is not None else None, _ptr(ro) if r2 is not None else None,
                                             _ptr(y_out) if y_out is not None else None, _ptr(q), _ptr(s), _ptr(z),
                                             m, k, float(eps), bits, int(sym), float(clip), _stream(x.device))
        _lib.check(rc, "rms_norm_quant")
    return q, s, z, ro


@torch.library.custom_op("ostquant::rms_norm_quant", mutates_args=())
def _rms_norm_quant_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                       bits: int, sym: bool, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    shp, k = x.shape[:-1], x.shape[-1]
    if _rms_quant_kernel_ok(x, residual, weight, bits):
        q, s, z, ro = _rms_quant_cuda(x, residual, weight, eps, bits, sym, clip)
    else:
        q, s, z, ro = rms_norm_quant_ref(x, residual, weight, eps, bits, sym, clip)
        ro = x.new_empty(0) if ro is None else ro
    return (q.reshape(*shp, k).contiguous(), s.reshape(*shp, 1).contiguous(), z.reshape(*shp, 1).contiguous(),
            ro.reshape(x.shape).contiguous() if residual is not None else ro)


@_rms_norm_quant_op.register_fake
def _(x, residual, weight, eps, bits, sym, clip):
    shp = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*shp, 1), dtype=torch.float32),
            x.new_empty((*shp, 1), dtype=torch.float32),
            x.new_empty(x.shape) if residual is not None else x.new_empty(0))


def rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                   bits: int, sym: bool = False, clip: float = 1.0):
    """vLLM's RMSNorm (with the residual add when given) and quantize_act of its output in one kernel:
    (q, scale, zero, x + residual) as rms_norm_quant_ref; the last is empty when residual is None."""
    return torch.ops.ostquant.rms_norm_quant(x, residual, weight, float(eps), int(bits), bool(sym), float(clip))


def silu_mul_quant_fusable(k: int, hadamard: int) -> bool:
    """Whether the CUDA library fuses SiluAndMul into the Hadamard quantizer for a down_proj input of k columns
    in `hadamard` blocks: where its version 6 runs (csrc ostq_silu_mul_quantize_had)."""
    if hadamard <= 0 or hadamard & (hadamard - 1) or k % hadamard:
        return False
    try:
        p2, b = _had.factor(k // hadamard)
    except ValueError:
        return False
    warps = k // (64 * b)
    return b in (12, 20, 28) and p2 <= 64 and k == 64 * b * warps and 1 <= warps <= 16


def _silu_quant_kernel_ok(gu: torch.Tensor, bits: int, hadamard: int) -> bool:
    return (gu.dtype == torch.bfloat16 and gu.shape[-1] % 16 == 0 and 2 <= bits <= 8
            and silu_mul_quant_fusable(gu.shape[-1] // 2, hadamard) and _use_cuda(gu))


def _silu_quant_cuda(gu, bits, sym, clip, hadamard, out=None):
    """Launch SiluAndMul + the Hadamard quantizer on gu [..., 2K] -> (q [M, K], scale [M, 1], zero [M, 1])."""
    k = gu.shape[-1] // 2
    g2 = _aligned(gu.reshape(-1, 2 * k))
    m = g2.shape[0]
    q, s, z = out if out is not None else _quant_outputs(m, k, gu.device)
    if m:
        b, log2p, table = _had_table(k // hadamard, gu.device)
        rc = _lib.load().ostq_silu_mul_quantize_had(_ptr(g2), _ptr(q), _ptr(s), _ptr(z), m, k, bits, int(sym),
                                                    float(clip), int(hadamard), b, log2p, _ptr(table),
                                                    _stream(gu.device))
        _lib.check(rc, "silu_mul_quantize_act")
    return q, s, z


@torch.library.custom_op("ostquant::silu_mul_quantize_act", mutates_args=())
def _silu_mul_quant_op(gu: torch.Tensor, bits: int, sym: bool, clip: float,
                       hadamard: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shp, k = gu.shape[:-1], gu.shape[-1] // 2
    if _silu_quant_kernel_ok(gu, bits, hadamard):
        q, s, z = _silu_quant_cuda(gu, bits, sym, clip, hadamard)
    else:
        q, s, z = silu_mul_quantize_act_ref(gu, bits, sym, clip, hadamard)
    return q.reshape(*shp, k).contiguous(), s.reshape(*shp, 1).contiguous(), z.reshape(*shp, 1).contiguous()


@_silu_mul_quant_op.register_fake
def _(gu, bits, sym, clip, hadamard):
    shp = gu.shape[:-1]
    return (gu.new_empty((*shp, gu.shape[-1] // 2), dtype=torch.int8),
            gu.new_empty((*shp, 1), dtype=torch.float32), gu.new_empty((*shp, 1), dtype=torch.float32))


def silu_mul_quantize_act(gu: torch.Tensor, bits: int, sym: bool = False, clip: float = 1.0, hadamard: int = 0):
    """vLLM's SiluAndMul of gu [..., 2K] = [gate | up] (fp32 math, one bf16 rounding), then quantize_act with
    the Hadamard of `hadamard` blocks, in one kernel where silu_mul_quant_fusable (else the reference)."""
    return torch.ops.ostquant.silu_mul_quantize_act(gu, int(bits), bool(sym), float(clip), int(hadamard))


# ---------------------------------------------------------------------------------------------
# int4 GEMM
# ---------------------------------------------------------------------------------------------
_COUNTERS: dict = {}
_N_COUNTERS = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _gemm_kernel_ok(a_q: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    if w.dim() != 4 or out_dtype not in (torch.bfloat16, torch.float16) or a_q.dtype != torch.int8:
        return False
    n, k = weight_shape(w)
    return a_q.shape[-1] == k and layout_ok(n, k) and w.is_contiguous() and _use_cuda(a_q, w)


# Which kernel ("kind", csrc plan_gemm) serves which shape, from the H100 measurements in
# benchmarks/results/kernels_h100.json and kernels_h100_midm.json (see benchmarks/NOTES_kernels.md):
#   M <= 8: 7 (decode: 16 weight rows a CTA, K split among its 4 warps, no global round trip)
#   M <= 16: 8 (decode, 16 tokens) for weights < 32 MB, else 0 (mma.sync, split-K over CTAs)
#   M <= 256: the decode kernel with R weight blocks a warp while it beats wgmma: 9 (R=2, 32
#     tokens) up to 32 tokens; 11 (R=4, 32 tokens a CTA row) up to 128; 12 (R=4, 64) up to 256 at
#     N <= 4096 or K >= 8192. Wide layers (N >= 16384, e.g. gate_up) take the pipelined wgmma: 25
#     (32-token tiles of 256 rows) up to 32 tokens, 22 (64 tokens, 128 rows) up to 64, then 5
#     (kernels_h100_midm.json, 8B gate_up: 27.6 us against the decode kernel's 32.9 at M = 24, 32.1
#     against kind 5's 36.0 at 64): they have CTAs enough, and the decode kernel re-reads the
#     activations once per 64 rows. 65-128 tokens at 6144 <= N < 16384 (8B qkv): 22 (15.2 us against
#     kind 11's 18.7 at M = 128; at N = 4096 kind 11 stays ahead).
#   8 warps a CTA (kinds 27-32 = 7-12 with K split over 8 warps; session 14, kernels_h100_decode.json, 8B
#     layers at M = 1, 16, 64): at K >= 4096 for M <= 8 (M = 1: 0.1-0.4 us less on every layer), and at
#     N <= 4096, K >= 4096 for 9-16 and 33-64 tokens (down at M = 64: 19.0 against kind 11's 22.2 us, o 8.8
#     against 9.8; qkv, N = 6144, loses: 16.0 against 12.5 at M = 64, 10.1 against 8.6 at 16). Where
#     nothing was measured (17-32 and 65-256 tokens, K < 4096) the 4-warp kinds stay.
#   6 weight blocks a warp (kind 35 = 31 with R = 6; session 15, kernels_h100_decode_r6.json) at 33-64 tokens
#     where 4 blocks need more than one wave of 8-warp CTAs (one an SM) and 6 fit in one: 8B qkv (N = 6144,
#     192 CTAs against 128 on 132 SMs) 11.8 against kind 11's 12.6 us at M = 64; o and down (128 CTAs with
#     4 blocks already) lose with 6.
#   M > 256, K % 128 == 0: the pipelined wgmma: 26 (128 x 256 tiles) for K >= 14336 (the down
#     projections: 8B M = 8192 835 against kind 6's 986 us, 70B 3350 against kind 3's 3752), else 6
#     (128 x 128 tiles: 3-5 % ahead of 5 summed over the layers; 26 loses at K = 4096), session 11
#   CUTLASS's mixed-input mainloop on our layout (kind 40; bf16 out, fp32 weight scales, N and K % 128 == 0;
#     session 19, kernels_h100_largem.json) replaces 5 and 12 above 64 tokens and 6 and 26 above 256, except 26 at
#     K >= 28672 (70B down: 4329 against 3328 us at M = 8192, a tie at 2048). At M = 256 it is 1.2-2.5x the
#     kinds it replaces on every 8B and 70B layer (8B: 14.5 / 14.2 / 51.3 / 40.1 us against 24.5 / 18.8 / 73.2 /
#     49.8), at 8192 1.15-1.47x on the others, at 2048 0.98-1.16x; end to end, batch 256 decodes 18 % faster.
#   otherwise: -1, the library's own choice (mma.sync tiles)
SMALL_M_SPLITK_BYTES = 32 << 20
WIDE_N = 16384
EIGHT_WARPS = 20  # kind + EIGHT_WARPS: the decode kind with 8 warps a CTA
CUTLASS_MANY_TOKENS = 1024  # from here kind 40 runs 128 x 256 tiles along the tokens (csrc/cutlass_gemm.cu)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _kind_map(spec: str) -> dict:
    """OSTQUANT_KIND_MAP (a measurement setting): "from[@NxK]:to,..." replaces the automatic choice
    `from` by `to`, for every shape or only for N x K; e.g. "35:11,31@4096x14336:24"."""
    out = {}
    for item in filter(None, spec.replace(" ", "").split(",")):
        try:
            src, dst = item.split(":")
            kind, _, shape = src.partition("@")
            key = (int(kind), tuple(int(v) for v in shape.split("x")) if shape else None)
            if key[1] is not None and len(key[1]) != 2:
                raise ValueError
            out[key] = int(dst)
        except ValueError:
            raise ValueError(f"OSTQUANT_KIND_MAP: bad entry {item!r} (want from[@NxK]:to)") from None
    return out


def _auto_force(m: int, n: int, k: int, device: torch.device | None = None, cutlass: bool = True) -> int:
    """OSTQUANT_GEMM_KIND, else _auto_kind for the SMs of `device` (default: the current CUDA device, if
    any), remapped by OSTQUANT_KIND_MAP. cutlass=False: the output or the weight scales are fp16, which
    kind 40 does not take."""
    env = os.environ.get("OSTQUANT_GEMM_KIND")
    if env:
        return int(env)
    if device is not None:
        index = device.index
    else:
        index = torch.cuda.current_device() if torch.cuda.is_available() else None
    kind = _auto_kind(m, n, k, 132 if index is None else _num_sms(index), cutlass)
    remap = _kind_map(os.environ.get("OSTQUANT_KIND_MAP", ""))
    return remap.get((kind, (n, k)), remap.get((kind, None), kind))


def _auto_kind(m: int, n: int, k: int, sms: int = 132, cutlass: bool = True) -> int:
    narrow = n <= 4096 and k >= 4096  # where the decode kernels gain from 8 warps (session 14)
    cutlass = cutlass and n % 128 == 0 and k % 128 == 0  # kind 40's tiles (the GPU tests cover these shapes)
    if m <= 8:
        return 7 + (EIGHT_WARPS if k >= 4096 else 0)
    if m <= 16:
        if n * k // 2 >= SMALL_M_SPLITK_BYTES:
            return 0
        return 8 + (EIGHT_WARPS if narrow else 0)
    if m <= 256:
        wide = n >= WIDE_N and k % 128 == 0
        if m <= 64 and wide:
            if cutlass and m > 32 and k < 8192:  # 8B gate_up at 64 tokens: 30.1 against 32.0 us (session 20,
                return 41                        # kernels_h100_decode_streamk.json; 70B gate_up: 103 against 97)
            return 25 if m <= 32 else 22
        if cutlass and 32 < m <= 64 and k >= 8192 and (n > k or k >= 28672):  # 70B qkv / down at 64 tokens:
            return 43 if k >= 28672 else 41  # 23.6 against 30.2 / 54.6 against 64.4 us (stream-K, session 20)
        if m <= 32:
            return 9
        if m <= 128:
            if wide:
                return 40 if cutlass else 5
            if m > 64 and n >= 6144 and k % 128 == 0:
                return 22
            halves = (m + 31) // 32  # 32-token CTA rows
            if 32 < m <= 64 and k >= 4096 and -(-n // 96) * halves <= sms < -(-n // 64) * halves:
                return 35  # one wave with 6 weight blocks a warp where 4 need more (session 15)
            return 11 + (EIGHT_WARPS if narrow and m <= 64 else 0)
        if cutlass:
            return 40
        if not wide and (n <= 4096 or k >= 8192):
            return 12
        if k % 128 == 0:
            return 5
        return 12
    if k % 128 == 0:  # H100, sessions 11, 19 and 20 (kernels_h100_largem.json, kernels_h100_sched.json)
        if cutlass and (m >= CUTLASS_MANY_TOKENS or k < 28672):  # 70B down: kind 40 at 8192 tokens (its
            return 40  # 128 x 256 tiles along the tokens) 1,516 TOP/s against kind 26's 1,156
        return 26 if k >= 14336 else 6
    return -1


def _gemm_cuda(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype, force=None, out=None):
    """Launch the CUDA GEMM (no checks beyond shapes). force: None = _auto_force, -1 = the
    library's heuristic, else a kernel kind (0/1/2/4 mma.sync split-K or tiles, 3/5 wgmma,
    7/8 decode, 9-12 decode with 2/4 weight blocks a warp and 32/64 tokens a CTA, 6 the pipelined
    wgmma, 13/14 wgmma with 64/32-token tiles, K split over a thread-block cluster, 15/16 the same with 256
    weight rows a CTA, 22-25 = 13-16 pipelined as 6, 26 pipelined with 128-token x 256-row tiles, 27-32 =
    7-12 with 8 warps a CTA, 33/34 = 12/32 with K split over a cluster of 2 CTAs, 35/36 = 31/11 with 6 weight blocks
    a warp, 40 CUTLASS's mixed-input mainloop, 41/42/43 the same with stream-K and 64/128/32 tokens a tile: bf16
    out, fp32 w_scale, K % 128 == 0). `out` (tests): [M, N]."""
    n, k = weight_shape(w)
    a2 = a_q.reshape(-1, k).contiguous()
    if a2.data_ptr() % 16:  # 16-B cp.async
        a2 = a2.clone()
    m = a2.shape[0]
    ws = w_scale.reshape(-1)
    if ws.dtype not in (torch.float32, torch.float16):
        ws = ws.float()
    ws = ws.contiguous()
    if force is None:
        force = _auto_force(m, n, k, a_q.device, out_dtype == torch.bfloat16 and ws.dtype == torch.float32)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    lib = _lib.load()
    as_ = a_scale.reshape(-1).to(torch.float32).contiguous()
    az = a_zero.reshape(-1).to(torch.float32).contiguous()
    wsum = w_sum.reshape(-1)
    if wsum.dtype != torch.int32:
        wsum = wsum.round().to(torch.int32) if wsum.is_floating_point() else wsum.to(torch.int32)
    wsum = wsum.contiguous()
    wbytes = lib.ostq_gemm_workspace_bytes(m, n, k, force)
    workspace = torch.empty(max(-(-wbytes // 4), 1), dtype=torch.int32, device=a_q.device)
    nctr = lib.ostq_gemm_counters(m, n, k, force)
    if nctr > _N_COUNTERS:
        raise RuntimeError(f"int4_gemm needs {nctr} tile counters > {_N_COUNTERS}")
    ctr = _counters(a_q.device)
    rc = lib.ostq_int4_gemm(_ptr(a2), _ptr(as_), _ptr(az), _ptr(w), _ptr(ws), int(ws.dtype == torch.float16),
                            _ptr(wsum), _ptr(out), int(out_dtype == torch.float16), m, n, k, _ptr(workspace),
                            _ptr(ctr), force, _stream(a_q.device))
    _lib.check(rc, "int4_gemm")
    return out


@torch.library.custom_op("ostquant::int4_gemm", mutates_args=())
def _int4_gemm_op(a_q: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w: torch.Tensor,
                  w_scale: torch.Tensor, w_sum: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if not _gemm_kernel_ok(a_q, w, out_dtype):
        return int4_gemm_ref(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype).contiguous()
    n, _ = weight_shape(w)
    return _gemm_cuda(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype).view(*a_q.shape[:-1], n)


@_int4_gemm_op.register_fake
def _(a_q, a_scale, a_zero, w, w_scale, w_sum, out_dtype):
    n, _ = weight_shape(w)
    return a_q.new_empty((*a_q.shape[:-1], n), dtype=out_dtype)


def int4_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_prepared: torch.Tensor,
              w_scale: torch.Tensor, w_sum: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out[..., n] = a_scale * w_scale[n] * (sum_k a_q[..., k] w[n, k] - a_zero * w_sum[n])."""
    return torch.ops.ostquant.int4_gemm(a_q, a_scale, a_zero, w_prepared, w_scale, w_sum, out_dtype)
