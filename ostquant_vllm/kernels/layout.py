"""The prepared int4 weight layout the Hopper GEMM reads (csrc/ostquant_kernels.cu, top comment).

Pure PyTorch, runs anywhere: `prepare_weight` is called once at load time.

Checkpoint layout (SPEC §7): int8 [N, K/2], two signed 4-bit values a byte, low nibble = even k.
Prepared layout: int8 [N/16, K/64, 32, 16]. For 16-row block nb, 64-wide k block kb and lane
l = 4*g + t of a warp, the 16 bytes are four little-endian words w[2s + h] (k32 step s, half h):
byte j of w[2s + h] = (W[16nb + g, k] << 4) | (W[16nb + 8 + g, k] & 15),  k = 64kb + 32s + 16h + 4t + j.
In the kernel `w & 0xF0F0F0F0` and `(w << 4) & 0xF0F0F0F0` are then the int8 A fragments
(times 16) of mma.m16n8k32 / wgmma.m64nNk32 for rows g and g + 8.
"""
from __future__ import annotations

import torch

from ..numerics import pack_int4, unpack_int4


def layout_ok(n: int, k: int) -> bool:
    return n % 16 == 0 and k % 64 == 0 and n > 0 and k > 0


def levels_to_prepared(w: torch.Tensor) -> torch.Tensor:
    """int8 levels [N, K] in [-8, 7] -> prepared int8 [N/16, K/64, 32, 16]."""
    n, k = w.shape
    if not layout_ok(n, k):
        raise ValueError(f"prepared layout needs N % 16 == 0 and K % 64 == 0, got {(n, k)}")
    W = w.to(torch.int32).view(n // 16, 2, 8, k // 64, 2, 2, 4, 4)  # nb, row-half, g, kb, s, h, t, j
    hi, lo = W[:, 0] & 15, W[:, 1] & 15                              # [nb, g, kb, s, h, t, j]
    byte = (hi << 4) | lo
    byte = byte.permute(0, 2, 1, 5, 3, 4, 6)                        # nb, kb, g, t, s, h, j
    return byte.reshape(n // 16, k // 64, 32, 16).to(torch.uint8).view(torch.int8).contiguous()


def prepared_to_levels(p: torch.Tensor) -> torch.Tensor:
    """Inverse of levels_to_prepared: [N/16, K/64, 32, 16] -> int8 levels [N, K]."""
    nb, kb = p.shape[0], p.shape[1]
    b = p.view(torch.uint8).to(torch.int32).view(nb, kb, 8, 4, 2, 2, 4)  # nb, kb, g, t, s, h, j
    hi, lo = b >> 4, b & 15
    hi, lo = hi - ((hi & 8) << 1), lo - ((lo & 8) << 1)
    W = torch.stack([hi, lo], dim=1)                                     # nb, half, kb, g, t, s, h, j
    W = W.permute(0, 1, 3, 2, 5, 6, 4, 7)                                # nb, half, g, kb, s, h, t, j
    return W.reshape(nb * 16, kb * 64).to(torch.int8)


def prepare_weight(qweight: torch.Tensor) -> torch.Tensor:
    """Checkpoint int4 [N, K/2] -> the kernel's layout (4-D); returned unchanged (2-D) when the
    shape does not fit the layout, and int4_gemm then takes the PyTorch reference path."""
    if qweight.dim() != 2 or qweight.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"qweight must be int8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if not layout_ok(n, k):
        return qweight.view(torch.int8)
    return levels_to_prepared(unpack_int4(qweight.view(torch.int8)))


def weight_levels(w: torch.Tensor) -> torch.Tensor:
    """int8 levels [N, K] from either a prepared (4-D) or a checkpoint-packed (2-D) weight."""
    if w.dim() == 4:
        return prepared_to_levels(w)
    return unpack_int4(w.view(torch.int8))


def weight_shape(w: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a prepared or packed weight."""
    if w.dim() == 4:
        return w.shape[0] * 16, w.shape[1] * 64
    return w.shape[0], w.shape[1] * 2


def unprepare_weight(p: torch.Tensor) -> torch.Tensor:
    """Prepared -> checkpoint packing [N, K/2] (for tests and debugging)."""
    return pack_int4(prepared_to_levels(p))
