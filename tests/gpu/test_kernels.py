"""GPU checks of the Hopper kernels against the reference math (skipped without an sm_90 GPU
and the built library: python -m ostquant_vllm.kernels.build).

GEMM: against an exact float64 model of the integer math, on fresh random inputs, outputs
NaN-poisoned first; bound |out - ref| <= 2^-8 |ref| (bf16 rounding is 2^-9): a wrong scale,
zero point or nibble order is off by far more. Quantize: against
numerics.quantize_act(hadamard.apply_hadamard(x.float())), allowing < 0.1% of +-1-level flips
(fp32 summation order at .5 ties) and 1e-5 relative on scales.
"""

import pytest
import torch

from ostquant_vllm import kernels
from ostquant_vllm.kernels import _gemm_cuda, _quant_cuda, _rms_quant_cuda, _silu_quant_cuda
from ostquant_vllm.kernels.layout import levels_to_prepared
from ostquant_vllm.kernels.reference import quantize_act_ref, rms_norm_ref, silu_mul_quantize_act_ref

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")

LLAMA8 = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
LLAMA70 = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
SMALL = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
SHAPES = SMALL + LLAMA8 + LLAMA70  # (K, N)
MS = [1, 3, 16, 64, 257, 2048]
DEV = "cuda"


def _weights(n, k, gen):
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV, generator=gen)
    return w, levels_to_prepared(w)


def _acts(m, k, bits, gen):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    a = torch.randint(lo, hi, (m, k), dtype=torch.int8, device=DEV, generator=gen)
    s = torch.rand(m, 1, device=DEV, generator=gen) * 0.02 + 1e-3
    z = torch.randint(lo, hi, (m, 1), device=DEV, generator=gen).float()
    return a, s, z


def _model(a, s, z, w, ws, wsum):
    acc = a.double() @ w.double().T
    return s.double() * ws.double().reshape(1, -1) * (acc - z.double() * wsum.double().reshape(1, -1))


def _check_gemm(out, ref, what):
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) outputs"
    err = (out.double() - ref).abs()
    bad = err > 2**-8 * ref.abs() + 1e-30
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outside bound; "
                           f"max rel {float((err / ref.abs().clamp_min(1e-30)).max()):.3e}")


@pytest.mark.parametrize("k,n", SHAPES)
def test_int4_gemm_shapes(k, n):
    gen = torch.Generator(device=DEV).manual_seed(k * 7 + n)
    w, wp = _weights(n, k, gen)
    wsum = w.int().sum(1).int()
    for m in MS:
        for bits in (4, 8):
            a, s, z = _acts(m, k, bits, gen)
            ws = (torch.rand(n, device=DEV, generator=gen) * 0.05 + 1e-3)
            ws = ws.half() if bits == 4 else ws  # both scale dtypes
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
            _gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, out=out)
            torch.cuda.synchronize()
            _check_gemm(out, _model(a, s, z, w, ws, wsum), f"M={m} N={n} K={k} a{bits}")


@pytest.mark.parametrize("force", list(range(17)) + list(range(22, 37)) + [40, 41, 42, 43])
@pytest.mark.parametrize("k,n", [(576, 960), (576, 1008), (4096, 6144), (14336, 4096)])  # 1008: 63 row blocks
def test_int4_gemm_each_kernel(k, n, force):
    """Every tile configuration at every M (the automatic choice uses each on part of the range)."""
    if (force in (3, 5, 6) or 13 <= force <= 26) and k % 128:
        pytest.skip("wgmma path needs K % 128 == 0 (falls back to mma)")
    if force >= 40 and k % 128:
        pytest.skip("the CUTLASS kind takes K % 128 == 0 only (the library answers cudaErrorNotSupported)")
    gen = torch.Generator(device=DEV).manual_seed(100 + force)
    w, wp = _weights(n, k, gen)
    wsum = w.int().sum(1).int()
    for m in MS + [129, 300]:
        a, s, z = _acts(m, k, 8, gen)
        ws = torch.rand(n, device=DEV, generator=gen) * 0.05
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        _gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=force, out=out)
        torch.cuda.synchronize()
        _check_gemm(out, _model(a, s, z, w, ws, wsum), f"kernel {force} M={m} N={n} K={k}")


DEC_KINDS = list(range(7, 13)) + list(range(27, 37))  # gemm_dec_kernel's kinds (csrc gemm_dispatch)


@pytest.mark.parametrize("force", DEC_KINDS)
def test_dec_epilogue_prefetch_equals_plain(force):
    """OSTQUANT_EPI_PREFETCH=1 (the default): the decode kinds copy their epilogue operands (w_scale, w_sum, a_scale,
    a_zero) into shared memory at the start; the outputs must be the same bits as the plain epilogue's, at token and
    row tails (the zero-filled copies past M and N are never stored), with fp32 and fp16 weight scales and both output
    dtypes."""
    from ostquant_vllm.kernels import _lib
    lib = _lib.load()
    gen = torch.Generator(device=DEV).manual_seed(300 + force)
    try:
        for k, n in [(576, 1008), (4096, 6144)]:  # 1008: 63 row blocks, a tail for R = 2, 4, 6
            w, wp = _weights(n, k, gen)
            wsum = w.int().sum(1).int()
            for m in (1, 3, 16, 37, 64):
                a, s, z = _acts(m, k, 4, gen)
                for ws in (torch.rand(n, device=DEV, generator=gen) * 0.05,
                           torch.rand(n, device=DEV, generator=gen).half()):
                    for od in (torch.bfloat16, torch.float16):
                        outs = []
                        for epf in (0, 1):
                            lib.ostq_set_epi_prefetch(epf)
                            outs.append(torch.full((m, n), float("nan"), dtype=od, device=DEV))
                            _gemm_cuda(a, s, z, wp, ws, wsum, od, force=force, out=outs[-1])
                        torch.cuda.synchronize()
                        what = f"kind {force} M={m} N={n} K={k} w_scale {ws.dtype} out {od}"
                        if od == torch.bfloat16:  # (fp16 out: its subnormals break the relative bound on tiny values)
                            _check_gemm(outs[0], _model(a, s, z, w, ws, wsum), what)
                        assert torch.equal(outs[0], outs[1]), f"{what}: prefetched epilogue differs"
    finally:
        lib.ostq_set_epi_prefetch(_lib.EPI_PREFETCH)


@pytest.mark.parametrize("raster,swizzle,tile", [(1, 4, 0), (2, 8, 0), (0, 1, 1), (2, 4, 1)])
def test_cutlass_settings(raster, swizzle, tile):
    """Kind 40 under other tile orders and the 128 x 256 tile (measurement settings) computes the same."""
    from ostquant_vllm.kernels import _lib
    lib = _lib.load()
    gen = torch.Generator(device=DEV).manual_seed(raster * 100 + swizzle * 10 + tile)
    try:
        lib.ostq_cutlass_set_sched(raster, swizzle, tile)
        for k, n in [(4096, 6144), (14336, 4096)]:
            w, wp = _weights(n, k, gen)
            wsum = w.int().sum(1).int()
            for m in MS + [300]:
                a, s, z = _acts(m, k, 4, gen)
                ws = torch.rand(n, device=DEV, generator=gen) * 0.05
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
                _gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=40, out=out)
                torch.cuda.synchronize()
                _check_gemm(out, _model(a, s, z, w, ws, wsum), f"kind 40 {raster}/{swizzle}/{tile} M={m} N={n} K={k}")
    finally:
        lib.ostq_cutlass_set_sched(-1, -1, -1)  # automatic


def test_int4_gemm_fp16_out_and_public_api():
    gen = torch.Generator(device=DEV).manual_seed(3)
    k, n, m = 4096, 4096, 37
    w, wp = _weights(n, k, gen)
    from ostquant_vllm.numerics import pack_int4
    assert torch.equal(kernels.prepare_weight(pack_int4(w)), wp)
    a, s, z = _acts(m, k, 4, gen)
    ws = torch.rand(n, device=DEV, generator=gen) * 0.05
    wsum = w.int().sum(1).int()
    ref = _model(a, s, z, w, ws, wsum)
    out = kernels.int4_gemm(a, s, z, wp, ws, wsum, torch.float16)
    assert out.dtype == torch.float16
    _check_gemm(out, ref, "fp16 out")
    out2 = kernels.int4_gemm(a, s.reshape(-1), z.reshape(-1), wp, ws, wsum.float())  # [M] scales, fp32 w_sum
    _check_gemm(out2, ref, "bf16 out, flat scales")


def test_int4_gemm_wgmma_splitk():
    """The wgmma split-K path (off by default: slower on H100) still computes the right thing."""
    lib = kernels._lib.load()
    gen = torch.Generator(device=DEV).manual_seed(11)
    k, n = 4096, 6144
    w, wp = _weights(n, k, gen)
    wsum = w.int().sum(1).int()
    lib.ostq_set_wgmma_split(1)
    try:
        for m in (64, 257):
            a, s, z = _acts(m, k, 8, gen)
            ws = torch.rand(n, device=DEV, generator=gen) * 0.05
            for force in (3, 5):
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
                _gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=force, out=out)
                torch.cuda.synchronize()
                _check_gemm(out, _model(a, s, z, w, ws, wsum), f"split-K kernel {force} M={m}")
    finally:
        lib.ostq_set_wgmma_split(int(kernels._lib.DEFAULT_WGMMA_SPLIT))


def test_int4_gemm_deterministic_and_graph():
    """Bit-identical across runs and inside a CUDA graph replay (with the fused quantizer)."""
    gen = torch.Generator(device=DEV).manual_seed(4)
    k, n = 14336, 4096
    w, wp = _weights(n, k, gen)
    wsum = w.int().sum(1).int()
    a, s, z = _acts(4, k, 4, gen)
    ws = torch.rand(n, device=DEV, generator=gen) * 0.05
    o1 = kernels.int4_gemm(a, s, z, wp, ws, wsum)
    o2 = kernels.int4_gemm(a, s, z, wp, ws, wsum)
    assert torch.equal(o1, o2)
    x = torch.randn(4, k, device=DEV, generator=gen).to(torch.bfloat16)
    kernels.quantize_act(x, 4, hadamard=True)  # warm (H_b table)
    kernels.int4_gemm(*kernels.quantize_act(x, 4, hadamard=True), wp, ws, wsum)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, sq, zq = kernels.quantize_act(x, 4, hadamard=True)
        og = kernels.int4_gemm(q, sq, zq, wp, ws, wsum)
    for _ in range(3):
        x.copy_(torch.randn(4, k, device=DEV, generator=gen).to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        q2, s2, z2 = kernels.quantize_act(x, 4, hadamard=True)
        assert torch.equal(q, q2)
        assert torch.equal(og, kernels.int4_gemm(q2, s2, z2, wp, ws, wsum))


@pytest.mark.parametrize("pdl,epf", [(1, 0), (1, 1)])
@pytest.mark.parametrize("m,k,n,had", [(1, 4096, 4096, False), (16, 4096, 6144, False), (64, 14336, 4096, True)])
def test_pdl_chain_equals_plain_launch(m, k, n, had, pdl, epf):
    """OSTQUANT_PDL=1 (the default): the decode GEMMs launched as programmatic dependents of the quantize kernel
    (their first weight stages in shared memory before griddepcontrol.wait) give the same bits as plain launches,
    eagerly and in a CUDA graph whose input changes between replays (a GEMM that read the activations too early
    would see the previous replay's levels or scales). With OSTQUANT_EPI_PREFETCH=1 too, the activation scales are
    copied right after the wait."""
    from ostquant_vllm.kernels import _lib

    gen = torch.Generator(device=DEV).manual_seed(m * 31 + k)
    w, wp = _weights(n, k, gen)
    wsum = w.int().sum(1).int()
    ws = torch.rand(n, device=DEV, generator=gen) * 0.05
    xs = [torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(4)]

    def chain(x):
        return kernels.int4_gemm(*kernels.quantize_act(x, 4, hadamard=had), wp, ws, wsum)

    lib = _lib.load()
    try:
        lib.ostq_set_pdl(0)
        lib.ostq_set_epi_prefetch(0)
        plain = [chain(x) for x in xs]
        lib.ostq_set_pdl(pdl)
        lib.ostq_set_epi_prefetch(epf)
        for x, ref in zip(xs, plain):
            assert torch.equal(chain(x), ref)
        x = xs[0].clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            og = chain(x)
        for xi, ref in list(zip(xs, plain))[::-1]:
            x.copy_(xi)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(og, ref)
    finally:
        lib.ostq_set_pdl(_lib.PDL)
        lib.ostq_set_epi_prefetch(_lib.EPI_PREFETCH)


def test_torch_compile_traces_ops():
    gen = torch.Generator(device=DEV).manual_seed(5)
    k, n = 1536, 576
    w, wp = _weights(n, k, gen)
    ws = torch.rand(n, device=DEV, generator=gen) * 0.05
    wsum = w.int().sum(1).int()

    def f(x):
        q, s, z = kernels.quantize_act(x, 4, hadamard=True)
        return kernels.int4_gemm(q, s, z, wp, ws, wsum)

    x = torch.randn(5, k, device=DEV, generator=gen).to(torch.bfloat16)
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(cf(x), f(x))


QK = [576, 1536, 3072, 4096, 8192, 14336, 28672]
HAD_K = [576, 1536, 4096, 8192, 14336, 28672]  # 576 = 9*64: no Hadamard of that order -> reference


def _check_quant(x, bits, sym, clip, hadamard, variant=None):
    m, k = x.shape
    q = torch.full((m, k), 99, dtype=torch.int8, device=DEV)
    s = torch.full((m, 1), float("nan"), device=DEV)
    z = torch.full((m, 1), float("nan"), device=DEV)
    _quant_cuda(x, bits, sym, clip, hadamard, out=(q, s, z), variant=variant)
    torch.cuda.synchronize()
    # reference on the CPU: there torch divides by the Python-int qmax exactly, as numerics.py
    # reads; CUDA torch multiplies by a rounded reciprocal instead (1-ulp scale differences
    # that flip levels at the frequent exact .5 ties of bf16 inputs)
    qr, sr, zr = (t.to(DEV) for t in quantize_act_ref(x.cpu(), bits, sym, clip, hadamard))
    what = f"M={m} K={k} bits={bits} sym={sym} clip={clip} had={hadamard} variant={variant}"
    assert not torch.isnan(s).any() and not torch.isnan(z).any(), what
    assert torch.allclose(s, sr, rtol=1e-5, atol=0), f"{what}: scale"
    if not hadamard:
        assert torch.equal(s, sr) and torch.equal(z, zr), f"{what}: plain scale/zero should be exact"
    zd = (z - zr).abs()
    assert zd.max() <= 1 and int((zd > 0).sum()) <= max(1, m // 1000), f"{what}: zero {int((zd > 0).sum())}"
    d = (q.int() - qr.int()).abs()
    nbad = int((d > 0).sum())
    assert d.max() <= 1 and nbad <= max(2, q.numel() // 1000), f"{what}: {nbad} level flips, max {int(d.max())}"
    if not hadamard:
        assert nbad == 0, f"{what}: plain quantization should be exact, {nbad} flips"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi, what


@pytest.mark.parametrize("k", QK)
def test_quantize_plain(k):
    gen = torch.Generator(device=DEV).manual_seed(k)
    for m in MS:
        cfgs = [(4, False, 1.0), (8, False, 1.0), (4, True, 1.0), (8, True, 0.9), (4, False, 0.9)]
        for bits, sym, clip in (cfgs if m < 2048 else cfgs[:2]):
            x = (torch.randn(m, k, device=DEV, generator=gen) * 3 + 0.5).to(torch.bfloat16)
            _check_quant(x, bits, sym, clip, False)


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("k", [1536, 4096, 8192, 14336, 28672, 20 * 64, 36 * 32, 52 * 16, 60 * 64,
                               12 * 512, 20 * 512])  # the last two: version 5 at B = 12, 20
def test_quantize_hadamard(k, variant):
    assert kernels._quant_kernel_ok(torch.empty(1, k, dtype=torch.bfloat16, device=DEV), 4, True)
    gen = torch.Generator(device=DEV).manual_seed(k + 1)
    for m in MS:
        cfgs = [(4, False), (8, False), (4, True)]
        for bits, sym in (cfgs if m < 2048 else cfgs[:1]):
            x = torch.randn(m, k, device=DEV, generator=gen)
            x[:, :: max(1, k // 7)] *= 20  # outlier channels, what the rotation is for
            _check_quant(x.to(torch.bfloat16), bits, sym, 1.0, True, variant)


# (K, blocks): the block-diagonal I_b (x) H_{K/b} of a TP-splittable checkpoint, full rows and one
# rank's slice: SmolLM2 (1536 = 8 x 12*16) at TP 1/2, Llama-3-8B (14336 = 8 x 28*64) at TP 1/2/4,
# Llama-3-70B (28672 = 8 x 28*128) at TP 1/2
HAD_BLOCKS = [(1536, 8), (768, 4), (14336, 8), (7168, 4), (3584, 2), (28672, 8), (14336, 4), (4096, 2)]


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("k,blocks", HAD_BLOCKS)
def test_quantize_hadamard_blocks(k, blocks, variant):
    assert kernels._quant_kernel_ok(torch.empty(1, k, dtype=torch.bfloat16, device=DEV), 4, blocks)
    gen = torch.Generator(device=DEV).manual_seed(k + blocks)
    for m in MS[:4]:
        for bits, sym in [(4, False), (8, False), (4, True)]:
            x = torch.randn(m, k, device=DEV, generator=gen)
            x[:, :: max(1, k // 7)] *= 20
            x[: m // 2, : k // blocks] *= 8  # one block much larger: the row's scale must span all blocks
            _check_quant(x.to(torch.bfloat16), bits, sym, 1.0, blocks, variant)


def test_quantize_hadamard_blocks_not_power_of_two_falls_back():
    """3 blocks cannot be split off by the kernel's butterflies: the op takes the reference."""
    x = torch.randn(5, 3 * 512, device=DEV).to(torch.bfloat16)
    assert not kernels._quant_kernel_ok(x, 4, 3)
    q, s, z = kernels.quantize_act(x, 4, hadamard=3)
    qr, sr, zr = quantize_act_ref(x, 4, False, 1.0, 3)
    assert torch.equal(q, qr) and torch.allclose(s, sr, rtol=1e-6)


def test_quantize_public_api_shapes():
    x = torch.randn(2, 3, 1536, device=DEV).to(torch.bfloat16)
    q, s, z = kernels.quantize_act(x, 4, hadamard=True)
    assert q.shape == x.shape and s.shape == (2, 3, 1) and z.shape == (2, 3, 1)


# The fused RMSNorm + quantizer (ostquant_vllm/fusion.py's kernel): each launch shape (K = 576 / 2048: 128 threads,
# 4096: 256 x 2 vectors, 5120 / 8192: 256 x 4, 16384: 512 x 4), with and without residual and weight.
RMS_K = [576, 2048, 4096, 5120, 8192, 16384]


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e - 7)


@pytest.mark.parametrize("k", RMS_K)
def test_rms_norm_quant(k):
    gen = torch.Generator(device=DEV).manual_seed(k + 7)
    eps = 1e-5
    for m in MS:
        for residual, weight, (bits, sym, clip) in [(True, True, (4, False, 1.0)), (False, True, (8, True, 0.9)),
                                                    (True, False, (8, False, 1.0)), (False, False, (4, True, 1.0))]:
            what = f"M={m} K={k} residual={residual} weight={weight} bits={bits} sym={sym}"
            x = (torch.randn(m, k, device=DEV, generator=gen) * 3 + 0.5).to(torch.bfloat16)
            x[:, :: max(1, k // 5)] *= 30  # outlier channels
            r = (torch.randn(m, k, device=DEV, generator=gen) * 2).to(torch.bfloat16) if residual else None
            w = (torch.rand(k, device=DEV, generator=gen) + 0.5).to(torch.bfloat16) if weight else None
            q = torch.full((m, k), 99, dtype=torch.int8, device=DEV)
            s = torch.full((m, 1), float("nan"), device=DEV)
            z = torch.full((m, 1), float("nan"), device=DEV)
            ro = torch.full((m, k), float("nan"), dtype=torch.bfloat16, device=DEV) if residual else x.new_empty(0)
            y = torch.full((m, k), float("nan"), dtype=torch.bfloat16, device=DEV)
            _rms_quant_cuda(x, r, w, eps, bits, sym, clip, y_out=y, out=(q, s, z, ro))
            torch.cuda.synchronize()
            yr, rr = rms_norm_ref(x.cpu(), r.cpu() if residual else None, w.cpu() if weight else None, eps)
            if residual:
                assert torch.equal(ro.cpu(), rr), f"{what}: residual"
            # the norm: within an ulp or two of the reference (rsqrt and the sum's order differ), mostly equal
            yd = (y.cpu().float() - yr.float()).abs()
            assert not torch.isnan(y).any() and bool((yd <= 2 * _bf16_ulp(yr.float())).all()), f"{what}: y"
            assert int((yd > 0).sum()) <= max(4, y.numel() // 50), f"{what}: y differs in {int((yd > 0).sum())}"
            # the quantizer on the kernel's own y: bit-exact (reference on the CPU, see _check_quant)
            qr, sr, zr = quantize_act_ref(y.cpu(), bits, sym, clip)
            assert torch.equal(s.cpu(), sr) and torch.equal(z.cpu(), zr), f"{what}: scale / zero"
            assert torch.equal(q.cpu(), qr), f"{what}: {int((q.cpu() != qr).sum())} levels differ"


def test_rms_norm_quant_public_op():
    gen = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(2, 3, 4096, device=DEV, generator=gen).to(torch.bfloat16)
    r = torch.randn(2, 3, 4096, device=DEV, generator=gen).to(torch.bfloat16)
    w = torch.rand(4096, device=DEV, generator=gen).to(torch.bfloat16)
    q, s, z, ro = kernels.rms_norm_quant(x, r, w, 1e-6, 4)
    assert q.shape == x.shape and s.shape == (2, 3, 1) and z.shape == (2, 3, 1) and ro.shape == x.shape
    q2, s2, z2, ro2 = _rms_quant_cuda(x, r, w, 1e-6, 4, False, 1.0)
    assert torch.equal(q.view(-1, 4096), q2) and torch.equal(s.view(-1, 1), s2) and torch.equal(ro.view(-1, 4096), ro2)
    cf = torch.compile(lambda a, b: kernels.rms_norm_quant(a, b, w, 1e-6, 4), backend="aot_eager", fullgraph=True)
    assert all(torch.equal(u, v) for u, v in zip(cf(x, r), (q, s, z, ro)))


# SiluAndMul + the Hadamard quantizer (version 6 with the gated load; fusion.py's down_proj kernel): Llama-3-8B's
# 14336 = 8 x 28 * 64 and its TP 2 / 4 slices, SmolLM2's 1536 = 8 x 12 * 16. The CPU reference's exp is not the
# GPU's, so a product can round to the other bf16 at a boundary (~1e-4 of them): scale and levels within that.
@pytest.mark.parametrize("k,blocks", [(14336, 8), (7168, 4), (3584, 2), (1536, 8)])
def test_silu_mul_quantize_hadamard(k, blocks):
    assert kernels.silu_mul_quant_fusable(k, blocks)
    gen = torch.Generator(device=DEV).manual_seed(k + blocks)
    for m in MS:
        for bits, sym in ([(4, False), (8, False), (4, True)] if m < 2048 else [(4, False)]):
            what = f"M={m} K={k} blocks={blocks} bits={bits} sym={sym}"
            gu = torch.randn(m, 2 * k, device=DEV, generator=gen) * 2
            gu[:, k:: max(1, k // 7)] *= 20  # outlier channels in up
            gu = gu.to(torch.bfloat16)
            q = torch.full((m, k), 99, dtype=torch.int8, device=DEV)
            s = torch.full((m, 1), float("nan"), device=DEV)
            z = torch.full((m, 1), float("nan"), device=DEV)
            _silu_quant_cuda(gu, bits, sym, 1.0, blocks, out=(q, s, z))
            torch.cuda.synchronize()
            qr, sr, zr = silu_mul_quantize_act_ref(gu.cpu(), bits, sym, 1.0, blocks)
            q, s, z = q.cpu(), s.cpu(), z.cpu()
            assert not torch.isnan(s).any() and torch.allclose(s, sr, rtol=1e-4, atol=0), f"{what}: scale"
            zd = (z - zr).abs()
            assert zd.max() <= 1 and int((zd > 0).sum()) <= max(1, m // 50), f"{what}: zero"
            dl = (q.int() - qr.int()).abs()
            same_zero = (zd == 0).expand_as(dl)
            nbad = int((dl[same_zero] > 0).sum())
            assert dl[same_zero].max() <= 1 and nbad <= max(4, q.numel() // 500), f"{what}: {nbad} level flips"
