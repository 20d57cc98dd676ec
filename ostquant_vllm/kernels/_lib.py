"""ctypes loading of the prebuilt shared library (python -m ostquant_vllm.kernels.build)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / "_build"
LIB_NAME = "libostquant_kernels.so"
ABI_VERSION = 6  # csrc's ostq_version(): raised whenever an entry point's arguments change

_lib = None
_err: str | None = None
DEFAULT_WGMMA = "5"
DEFAULT_SMALL_M = "1"       # M <= 16: 1 = decode kernels (K split inside a CTA), 0 = split-K mma
# wgmma split-K for mid M: off. Measured on H100 (benchmarks/NOTES_kernels.md): the int32
# partials' round trip costs more than the idle SMs it fills (8B o_proj M=256: 28.6 us without,
# 65 us with).
DEFAULT_WGMMA_SPLIT = "0"
# KV4 decode: tiles in flight a warp, 1 (registers) or 2 (shared memory; session 22: equal or faster at every
# batch and context measured, kv4_attention_h100_prefetch_session22.json)
KV4_PREFETCH = int(os.environ.get("OSTQUANT_KV4_PREFETCH", "2"))
# Decode GEMMs (session 23, H100, benchmarks/NOTES_kernels.md): launched as programmatic dependents of the quantize
# kernel before them (PDL) and with their epilogue operands copied into shared memory first. Batch 64 end to end,
# ours alone on one machine: 13,723-13,875 tok/s with neither, 14,128 with PDL, 14,669-14,814 with both.
PDL = int(os.environ.get("OSTQUANT_PDL", "1"))
EPI_PREFETCH = int(os.environ.get("OSTQUANT_EPI_PREFETCH", "1"))
# KV4 decode as a programmatic dependent of the cache write: a setting, off (no gain end to end, session 23)
KV4_PDL = int(os.environ.get("OSTQUANT_KV4_PDL", "0"))


def lib_path() -> Path:
    return Path(os.environ.get("OSTQUANT_KERNELS_LIB", BUILD_DIR / LIB_NAME))


def load():
    """The ctypes library, or None (reason in load_error())."""
    global _lib, _err
    if _lib is not None or _err is not None:
        return _lib
    p = lib_path()
    try:
        lib = ctypes.CDLL(str(p))
    except OSError as e:
        _err = f"{p}: {e}"
        return None
    vp, i, f, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_longlong
    lib.ostq_version.restype = i
    if lib.ostq_version() != ABI_VERSION:  # a library built from other sources would misread the arguments
        _err = (f"{p} has ABI {lib.ostq_version()}, this package needs {ABI_VERSION}: rebuild it "
                "(python -m ostquant_vllm.kernels.build)")
        return None
    lib.ostq_gemm_workspace_bytes.argtypes = [i, i, i, i]
    lib.ostq_gemm_workspace_bytes.restype = ll
    lib.ostq_gemm_counters.argtypes = [i, i, i, i]
    lib.ostq_gemm_counters.restype = ll
    lib.ostq_int4_gemm.argtypes = [vp, vp, vp, vp, vp, i, vp, vp, i, i, i, i, vp, vp, i, vp]
    lib.ostq_int4_gemm.restype = i
    lib.ostq_quantize_act.argtypes = [vp, vp, vp, vp, i, i, i, i, f, i, i, i, vp, i, vp]
    lib.ostq_hb_mask.argtypes = [i, i]
    lib.ostq_hb_mask.restype = ctypes.c_ulonglong
    lib.ostq_quantize_act.restype = i
    lib.ostq_rms_norm_quant.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, i, i, f, i, i, f, vp]
    lib.ostq_rms_norm_quant.restype = i
    lib.ostq_silu_mul_quantize_had.argtypes = [vp, vp, vp, vp, i, i, i, i, f, i, i, i, vp, vp]
    lib.ostq_silu_mul_quantize_had.restype = i
    lib.ostq_set_wgmma.argtypes = [i]
    lib.ostq_set_wgmma.restype = None
    # C-side automatic choice for M > 64 (used only when Python passes force=-1): 5 wgmma with
    # weights via shared memory, 3 wgmma with weights via registers, 0 mma.sync only. Kind 6
    # (pipelined wgmma) FAILED the H100 correctness test and is never selected.
    mode = int(os.environ.get("OSTQUANT_WGMMA", DEFAULT_WGMMA))
    lib.ostq_set_wgmma(mode if mode in (0, 3, 5) else 5)
    lib.ostq_set_small.argtypes = [i]
    lib.ostq_set_small.restype = None
    lib.ostq_set_small(int(os.environ.get("OSTQUANT_SMALL_M", DEFAULT_SMALL_M)))
    lib.ostq_set_pdl.argtypes = [i]  # programmatic dependent launch of the decode GEMMs
    lib.ostq_set_pdl.restype = None
    lib.ostq_set_pdl(PDL)
    lib.ostq_set_epi_prefetch.argtypes = [i]  # the decode GEMMs' epilogue operands copied first
    lib.ostq_set_epi_prefetch.restype = None
    lib.ostq_set_epi_prefetch(EPI_PREFETCH)
    lib.ostq_set_wgmma_split.argtypes = [i]
    lib.ostq_set_wgmma_split.restype = None
    lib.ostq_set_wgmma_split(int(os.environ.get("OSTQUANT_WGMMA_SPLIT", DEFAULT_WGMMA_SPLIT)))
    # 4-bit KV cache (csrc/kv4_attention.cu, used by ostquant_vllm/kv4_attention.py)
    lib.ostq_kv4_write.argtypes = [vp, vp, vp, vp, i, i, i, ll, ll, ll, ll, ll, ll, ll, i, vp, vp]
    lib.ostq_kv4_write.restype = i
    lib.ostq_kv4_decode.argtypes = [vp, ll, ll, vp, ll, ll, vp, ll, ll, ll, vp, ll, vp, vp, i, i, i, i, i, f, vp,
                                    vp, vp, vp, i, i, vp]
    lib.ostq_kv4_decode.restype = i
    lib.ostq_kv4_dequant.argtypes = [vp, ll, ll, ll, vp, vp, i, i, i, i, vp, vp, vp, vp]
    lib.ostq_kv4_dequant.restype = i
    lib.ostq_kv4_set_min_tiles.argtypes = [i]
    lib.ostq_kv4_set_min_tiles.restype = None
    if os.environ.get("OSTQUANT_KV4_MIN_TILES"):  # the least 16-token tiles a decode split takes (default 16)
        lib.ostq_kv4_set_min_tiles(int(os.environ["OSTQUANT_KV4_MIN_TILES"]))
    lib.ostq_kv4_set_prefetch.argtypes = [i]
    lib.ostq_kv4_set_prefetch.restype = None
    lib.ostq_kv4_set_prefetch(KV4_PREFETCH)
    lib.ostq_kv4_set_pdl.argtypes = [i]
    lib.ostq_kv4_set_pdl.restype = None
    lib.ostq_kv4_set_pdl(KV4_PDL)
    lib.ostq_cutlass_set_sched.argtypes = [i, i, i]  # kind 40's tile order and shape (csrc/cutlass_gemm.cu),
    lib.ostq_cutlass_set_sched.restype = None       # measurement settings; -1: automatic
    lib.ostq_cutlass_set_sched(*(int(os.environ.get(f"OSTQUANT_CUTLASS_{v}", "-1"))
                                 for v in ("RASTER", "SWIZZLE", "TILE")))
    lib.ostq_probe_mma.argtypes = [i, i, i, i, vp, vp]  # a measurement (benchmarks/mma_probe.py)
    lib.ostq_probe_mma.restype = i
    lib.ostq_error_string.argtypes = [i]
    lib.ostq_error_string.restype = ctypes.c_char_p
    _lib = lib
    return lib


def load_error() -> str | None:
    load()
    return _err


def check(rc: int, what: str) -> None:
    if rc != 0:
        msg = _lib.ostq_error_string(rc).decode() if _lib is not None else str(rc)
        raise RuntimeError(f"ostquant kernel {what} failed: {msg} ({rc})")
