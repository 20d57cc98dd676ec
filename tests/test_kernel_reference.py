"""CPU checks of the kernel package: int4 packing, the prepared layout (decoded the way the CUDA
kernel's registers see it), the reference GEMM epilogue against a float64 model, and the
custom ops' fallback path and fake implementations."""
import numpy as np
import pytest
import torch

from ostquant_vllm import kernels
from ostquant_vllm.hadamard import apply_hadamard
from ostquant_vllm.kernels.layout import prepared_to_levels, unprepare_weight, weight_levels
from ostquant_vllm.numerics import pack_int4, quantize_act, unpack_int4


def _levels(n, k, g):
    return torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)


def test_pack_roundtrip_and_nibble_order():
    g = torch.Generator().manual_seed(0)
    w = _levels(5, 34, g)
    p = pack_int4(w)
    assert p.shape == (5, 17) and p.dtype == torch.int8
    assert torch.equal(unpack_int4(p), w)
    # low nibble = even column
    u = p.view(torch.uint8).to(torch.int32)
    lo = (u & 15) - (((u & 15) & 8) << 1)
    assert torch.equal(lo.to(torch.int8), w[:, 0::2])


@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (576, 1536)])
def test_prepared_roundtrip(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = _levels(n, k, g)
    p = kernels.prepare_weight(pack_int4(w))
    assert p.shape == (n // 16, k // 64, 32, 16) and p.dtype == torch.int8
    assert torch.equal(prepared_to_levels(p), w)
    assert torch.equal(unprepare_weight(p), pack_int4(w))
    assert torch.equal(weight_levels(p), w)


def test_prepare_weight_odd_shape_passthrough():
    w = _levels(24, 64, torch.Generator().manual_seed(1))
    p = kernels.prepare_weight(pack_int4(w))
    assert p.dim() == 2 and torch.equal(weight_levels(p), w)


def test_prepared_layout_matches_mma_fragments():
    """Decode each lane's 16 bytes exactly as the kernel does (w & 0xF0F0F0F0, (w << 4) & ...) and
    place the bytes by the PTX m16n8k32 A-fragment layout: must give 16 * W."""
    n, k = 32, 128
    w = _levels(n, k, torch.Generator().manual_seed(2))
    p = kernels.prepare_weight(pack_int4(w)).view(torch.uint8).numpy()
    words = p.reshape(n // 16, k // 64, 32, 16).view("<u4")  # [nb, kb, lane, 4]
    A = np.zeros((n, k), dtype=np.int64)
    for nb in range(n // 16):
        for kb in range(k // 64):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for s in range(2):
                    w01, w23 = int(words[nb, kb, lane, 2 * s]), int(words[nb, kb, lane, 2 * s + 1])
                    regs = [w01 & 0xF0F0F0F0, (w01 << 4) & 0xF0F0F0F0, w23 & 0xF0F0F0F0, (w23 << 4) & 0xF0F0F0F0]
                    for r, reg in enumerate(regs):
                        for j in range(4):
                            byte = (reg >> (8 * j)) & 0xFF
                            val = byte - 256 if byte >= 128 else byte
                            row = g + (8 if r in (1, 3) else 0)
                            col = t * 4 + j + (16 if r >= 2 else 0)
                            A[nb * 16 + row, kb * 64 + s * 32 + col] = val
    assert np.array_equal(A, 16 * w.numpy().astype(np.int64))


def _float64_model(a, a_s, a_z, w, w_s, w_sum):
    acc = a.double() @ w.double().T
    return a_s.double().reshape(-1, 1) * w_s.double().reshape(1, -1) * (acc - a_z.double().reshape(-1, 1) * w_sum.double().reshape(1, -1))


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_gemm_epilogue(bits):
    g = torch.Generator().manual_seed(bits)
    m, n, k = 7, 48, 192
    x = torch.randn(m, k, generator=g)
    q, s, z = quantize_act(x, bits)
    w = _levels(n, k, g)
    ws = (torch.rand(n, generator=g) * 0.1).half()
    wsum = w.int().sum(1)
    out = kernels.int4_gemm(q, s, z, kernels.prepare_weight(pack_int4(w)), ws, wsum)
    ref = _float64_model(q, s, z, w, ws, wsum)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert torch.all((out.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-12)
    # the integer model dequantizes to x @ w^T up to the activation quantization error
    deq = (s * (q.float() - z)) @ (w.float() * ws.float()[:, None]).T
    assert torch.allclose(ref.float(), deq, rtol=1e-4, atol=1e-4)


def test_reference_gemm_float_wsum_and_packed_weight():
    g = torch.Generator().manual_seed(5)
    m, n, k = 3, 24, 64  # 24 rows: packed (2-D) fallback layout
    a = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g)
    w = _levels(n, k, g)
    s, z = torch.rand(m, 1, generator=g), torch.randint(-8, 8, (m, 1), generator=g).float()
    ws = torch.rand(n, generator=g)
    out = kernels.int4_gemm(a, s, z, kernels.prepare_weight(pack_int4(w)), ws, w.float().sum(1))
    ref = _float64_model(a, s, z, w, ws, w.int().sum(1))
    assert torch.all((out.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-12)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("bits,sym", [(4, False), (8, False), (4, True)])
def test_quantize_act_fallback_matches_reference(bits, sym, hadamard):
    x = torch.randn(2, 3, 1536, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    q, s, z = kernels.quantize_act(x, bits, sym=sym, hadamard=hadamard)
    xr = apply_hadamard(x.float()) if hadamard else x
    q2, s2, z2 = quantize_act(xr, bits, sym=sym)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(z, z2)
    assert q.shape == x.shape and s.shape == (2, 3, 1)


def test_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 576, dtype=torch.bfloat16)
        q, s, z = kernels.quantize_act(x, 4, hadamard=False)
        assert q.shape == (4, 576) and q.dtype == torch.int8 and s.shape == (4, 1)
        w = torch.empty(960 // 16, 576 // 64, 32, 16, dtype=torch.int8)
        out = kernels.int4_gemm(q, s, z, w, torch.empty(960), torch.empty(960, dtype=torch.int32))
        assert out.shape == (4, 960) and out.dtype == torch.bfloat16


def test_opcheck():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.ostquant.quantize_act.default, (x, 4, False, 1.0, True))
    w = kernels.prepare_weight(pack_int4(_levels(32, 128, g)))
    q, s, z = kernels.quantize_act(x, 8)
    torch.library.opcheck(torch.ops.ostquant.int4_gemm.default,
                          (q, s, z, w, torch.rand(32, generator=g), torch.zeros(32, dtype=torch.int32), torch.bfloat16))


def test_available_false_on_cpu():
    if not torch.cuda.is_available():
        assert not kernels.available()
        assert kernels.unavailable_reason()


def test_library_of_another_abi_is_refused(monkeypatch):
    """A kernel library built from other sources would misread the arguments: load() refuses it by name."""
    from types import SimpleNamespace

    from ostquant_vllm.kernels import _lib

    def ostq_version():  # the entry point of a library built before the arguments changed
        return 1

    monkeypatch.setattr(_lib.ctypes, "CDLL", lambda path: SimpleNamespace(ostq_version=ostq_version))
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "_err", None)
    assert _lib.load() is None
    assert "ABI 1" in _lib.load_error() and f"needs {_lib.ABI_VERSION}" in _lib.load_error() and "rebuild" in _lib.load_error()


def test_build_needs_cutlass_headers_and_says_where_to_get_them(monkeypatch):
    import sys

    from ostquant_vllm.kernels import build

    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # not installed
    with pytest.raises(SystemExit, match=r"pip install nvidia-cutlass==4\.2\.0\.0"):
        build.build_command("nvcc", build.BUILD_DIR / build.LIB_NAME)
    assert any(p.name == "cutlass_gemm.cu" for p in build.SOURCES)


def test_auto_kernel_choice():
    from ostquant_vllm.kernels import _auto_force
    assert _auto_force(16, 57344, 8192) == 0
    # above 256 tokens CUTLASS's mainloop (kind 40, kernels_h100_largem.json), at K >= 28672 (70B down) from 1024
    # tokens only (its 128 x 256 tiles along the tokens, kernels_h100_sched.json), kind 26 below
    assert _auto_force(2048, 4096, 4096) == 40 and _auto_force(8192, 4096, 14336) == 40
    assert _auto_force(2048, 8192, 28672) == 40 and _auto_force(8192, 8192, 28672) == 40
    assert _auto_force(512, 8192, 28672) == 26 and _auto_force(1024, 8192, 28672) == 40
    # 64 tokens: CUTLASS with stream-K on 8B gate_up (41), 70B qkv (41) and down (43), not on 70B gate_up / o
    assert _auto_force(64, 28672, 4096) == 41 and _auto_force(64, 10240, 8192) == 41
    assert _auto_force(64, 8192, 28672) == 43 and _auto_force(64, 57344, 8192) == 22
    assert _auto_force(64, 8192, 8192) == 11 and _auto_force(32, 8192, 28672) == 9
    assert _auto_force(64, 28672, 4096, cutlass=False) == 22 and _auto_force(64, 8192, 28672, cutlass=False) == 11
    # fp16 output or fp16 weight scales (kind 40 takes neither): the pipelined wgmma, 26 from K = 14336
    assert _auto_force(2048, 4096, 4096, cutlass=False) == 6 and _auto_force(2048, 4096, 14336, cutlass=False) == 26
    assert _auto_force(8192, 28672, 4096, cutlass=False) == 6
    # batches of 17-256 tokens (kernels_h100_midm.json): the decode kernel with R weight blocks
    assert _auto_force(32, 4096, 14336) == 9 and _auto_force(32, 28672, 4096) == 25
    assert _auto_force(128, 4096, 14336) == 11
    assert _auto_force(64, 6144, 4096) == 35 and _auto_force(96, 6144, 4096) == 22  # 8B qkv
    assert _auto_force(48, 57344, 8192) == 22 and _auto_force(65, 28672, 4096) == 40  # wide layers: kind 40
    assert _auto_force(65, 28672, 4096, cutlass=False) == 5
    assert _auto_force(129, 4096, 14336) == 40 and _auto_force(256, 6144, 4096) == 40  # 129-256: kind 40
    assert _auto_force(256, 4096, 14336, cutlass=False) == 12 and _auto_force(256, 6144, 4096, cutlass=False) == 5
    assert _auto_force(256, 4080, 4096) == 12  # N % 128: not kind 40's tiles
    assert _auto_force(64, 576, 576) == 11  # the decode kernels need K % 64 only
    assert _auto_force(512, 576, 576) == -1  # K % 128 at large M: the library's mma tiles


def test_auto_kernel_choice_eight_warp_decode():
    """The 8-warp decode kinds (27-32 = 7-12 + 20) only where kernels_h100_decode.json measured them ahead:
    M <= 8 at K >= 4096; 9-16 and 33-64 tokens at N <= 4096, K >= 4096 (8B o and down, not qkv)."""
    from ostquant_vllm.kernels import _auto_force
    assert [_auto_force(1, n, k) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))] == [27] * 4
    assert _auto_force(1, 960, 576) == 7  # the default model's small K: not measured, 4 warps
    assert [_auto_force(16, n, k) for n, k in ((6144, 4096), (4096, 4096), (4096, 14336))] == [8, 28, 28]
    assert [_auto_force(64, n, k) for n, k in ((6144, 4096), (4096, 4096), (4096, 14336))] == [35, 31, 31]
    assert _auto_force(32, 4096, 14336) == 9 and _auto_force(128, 4096, 4096) == 11  # not measured


def test_auto_kernel_choice_six_blocks_one_wave():
    """Kind 35 (6 weight blocks a warp) at 33-64 tokens only where 4 blocks a warp need more than one wave of
    8-warp CTAs and 6 fit in one (kernels_h100_decode_r6.json: 8B qkv 11.8 against 12.6 us at M = 64)."""
    from ostquant_vllm.kernels import _auto_kind
    assert _auto_kind(64, 6144, 4096) == 35 and _auto_kind(33, 6144, 4096) == 35
    assert _auto_kind(64, 6144, 4096, sms=200) == 11  # 192 CTAs fit one wave: 4 blocks stay
    assert _auto_kind(64, 6144, 4096, sms=100) == 11  # 6 blocks would not fit either
    assert _auto_kind(64, 10240, 8192, cutlass=False) == 11  # 70B qkv (kind 41 where it may: test_auto_kernel_choice)
    assert _auto_kind(96, 4096, 4096) == 11  # 65-128 tokens
    assert _auto_kind(32, 6144, 4096) == 9 and _auto_kind(64, 1536, 576) == 11  # the default model's K


def test_kind_map_setting(monkeypatch):
    """OSTQUANT_KIND_MAP replaces the automatic choice, per shape where it names one; a bad entry names itself."""
    from ostquant_vllm.kernels import _auto_force
    monkeypatch.setenv("OSTQUANT_KIND_MAP", "35:11, 31@4096x14336:24")
    assert _auto_force(64, 6144, 4096) == 11  # 35 -> 11 at any shape
    assert _auto_force(64, 4096, 14336) == 24 and _auto_force(64, 4096, 4096) == 31  # down only
    assert _auto_force(1, 6144, 4096) == 27  # other choices stay
    monkeypatch.setenv("OSTQUANT_KIND_MAP", "31@4096:24")
    with pytest.raises(ValueError, match="31@4096:24"):
        _auto_force(64, 4096, 4096)


def test_pick_kinds():
    """benchmarks/pick_kinds.py maps an automatic kind to a CUTLASS kind only where that is faster by the gain,
    the first token count first, never kind 40."""
    from benchmarks.pick_kinds import pick

    def row(kernel, m, n, us, auto=None):
        r = {"kernel": kernel, "M": m, "N": n, "K": 4096, "us": us}
        return r if auto is None else {**r, "auto_kind": auto}
    rows = [row("ostquant_w4a4", 64, 4096, 9.0, 31), row("ostquant_w4a4_force_cutlass41_sk64", 64, 4096, 6.0),
            row("ostquant_w4a4_force_cutlass43_sk32", 64, 4096, 7.0),
            row("ostquant_w4a4", 16, 4096, 7.0, 31), row("ostquant_w4a4_force_cutlass43_sk32", 16, 4096, 5.0),
            row("ostquant_w4a4", 64, 6144, 12.0, 35), row("ostquant_w4a4_force_cutlass41_sk64", 64, 6144, 11.7),
            row("ostquant_w4a4", 256, 6144, 14.0, 40), row("ostquant_w4a4_force_cutlass42_sk128", 256, 6144, 9.0)]
    assert pick(rows, [64, 16, 256], 0.05) == "31@4096x4096:41"


def test_auto_hadamard_variant():
    """Version 6 (variant 8) for blocks of 28 * 64 (8B's down_proj in 8 blocks) at any M, else the library's choice."""
    from ostquant_vllm.kernels import _had_auto_variant
    assert _had_auto_variant(1, 28, 6) == 8 and _had_auto_variant(8192, 28, 6) == 8
    assert _had_auto_variant(64, 28, 7) == 0  # 70B's 28 * 128
    assert _had_auto_variant(64, 12, 4) == 0  # the default model's 1536 / 8 = 12 * 16
