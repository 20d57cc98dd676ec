"""Hadamard construction and the quantizers' arithmetic (SPEC §3, §4), checked against float64 models."""
import pytest
import torch

from ostquant_vllm.hadamard import SUPPORTED_B, apply_hadamard, factor, hadamard_matrix
from ostquant_vllm.numerics import (act_qparams, fake_quant_act, fake_quant_kv_int4, fake_quant_weight,
                                    int4_kv_quantize, pack_int4, quantize_act, rht, unpack_int4, weight_scale)


@pytest.mark.parametrize("n", [b * 2**k for b in SUPPORTED_B for k in (0, 3)] + [576, 1536])
def test_hadamard_orthonormal_and_fast_transform(n):
    H = hadamard_matrix(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n**-0.5))  # a real Hadamard: all entries +-1/sqrt(n)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ H, atol=1e-10)


@pytest.mark.parametrize("n", [14336, 8960, 28672])
def test_large_hadamard_fast_transform(n):
    rows = apply_hadamard(torch.eye(n, dtype=torch.float64)[:4])      # 4 rows of H
    assert torch.allclose(rows.abs(), torch.full_like(rows, n**-0.5))
    assert torch.allclose(rows @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x).norm(dim=1), x.norm(dim=1))


def test_hadamard_refuses_sizes_without_a_construction():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 11008"):
        factor(11008)  # 172 * 64: order 172 is not built


def test_int4_pack_roundtrip_and_layout():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (7, 32) and p.dtype == torch.int8
    assert torch.equal(unpack_int4(p), q)
    # low nibble = even column, two's complement nibbles
    assert pack_int4(torch.tensor([[-1, 2]], dtype=torch.int8)).view(torch.uint8).item() == 0x2F
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_activation_quant_exact_on_grid(bits):
    scale = torch.rand(16, 1) + 0.1
    levels = torch.randint(0, 2**bits, (16, 64)).float()
    levels[:, 0], levels[:, 1] = 0, 2**bits - 1          # the grid's ends are hit, so the scale is recovered
    zero = torch.randint(1, 2**bits - 1, (16, 1)).float()
    x = (levels - zero) * scale
    assert torch.allclose(fake_quant_act(x, bits), x, atol=1e-5 * scale.max().item())
    q, s, z = quantize_act(x, bits)
    assert torch.allclose(s * (q.float() - z), x, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quant_error_bound(bits):
    x = torch.randn(64, 512) * torch.rand(64, 1) * 10
    scale, _ = act_qparams(x, bits)
    err = (fake_quant_act(x, bits) - x).abs()
    assert (err <= scale / 2 + 1e-5).all()  # round to nearest on a grid that covers [min, max]
    q, s, z = quantize_act(x, bits)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1


def test_weight_quant_bound_and_mse_clip_helps():
    w = torch.randn(64, 256)
    w[0, 0] = 20.0  # an outlier: the MSE search shrinks the range of its row
    s_mse = weight_scale(w, 4, mse=True)
    s_max = weight_scale(w, 4, mse=False)
    assert (s_mse <= s_max + 1e-7).all() and (s_mse[0] < s_max[0])
    err_max = (fake_quant_weight(w, 4) - w)
    assert (err_max.abs() <= s_max[:, None] / 2 + 1e-6).all()  # no clipping at absmax / 7 ... -8
    wq_mse = torch.clamp(torch.round(w / s_mse[:, None]), -8, 7) * s_mse[:, None]
    assert ((wq_mse - w).abs().pow(2.4).sum(1) <= (err_max.abs().pow(2.4).sum(1) + 1e-6)).all()


def _vllm_int4_reference(x):
    """A direct float64 transcription of vLLM 0.26's _reshape_cache_int4_kernel + the reader's dequant."""
    d = x.shape[-1]
    gen = torch.Generator().manual_seed(0x9E3779B9)
    signs = 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < d:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    y = (x.double() * signs.double()) @ H.T
    y = y.float()
    out = torch.empty_like(y)
    for r in range(y.shape[0]):
        v = y[r]
        scale = max(((v.max() - v.min()) / 15.0).item(), 1e-6)
        scale = torch.tensor(scale, dtype=torch.float32)
        t = -v.min() / scale
        zp = min(max(float(int(t + 0.5) if t >= 0 else int(t - 0.5)), 0.0), 15.0)
        s = v * (1.0 / scale) + zp
        q = torch.clamp(torch.where(s >= 0, (s + 0.5).trunc(), (s - 0.5).trunc()), 0, 15)
        read = torch.tensor([scale.item()], dtype=torch.float32).view(torch.int32) & -16
        out[r] = (q - zp) * read.view(torch.float32)
    return (out.double() @ H * signs.double() / d).float()


@pytest.mark.parametrize("d", [64, 128])
def test_kv_int4_matches_vllm_kernel_math(d):
    x = torch.randn(32, d) * 3
    assert torch.allclose(fake_quant_kv_int4(x), _vllm_int4_reference(x), atol=1e-5)


def test_kv_int4_zero_point_lives_in_scale_mantissa():
    y = rht(torch.randn(8, 64))
    q, zero, read_scale = int4_kv_quantize(y)
    assert ((read_scale.view(torch.int32) & 0xF) == 0).all()
    assert q.min() >= 0 and q.max() <= 15 and (zero >= 0).all() and (zero <= 15).all()
    assert torch.allclose(rht(rht(y, inverse=True), inverse=False) / 64, y, atol=1e-4)


def test_kv_int4_error_bound():
    x = torch.randn(256, 64)
    rel = ((fake_quant_kv_int4(x) - x).norm() / x.norm()).item()
    assert 0.02 < rel < 0.15  # 4 bits over a gaussianised range: about 0.09


def test_straight_through_gradients_and_range_gradients():
    """Round is straight-through; the scale keeps its true gradient through each row's min and max
    (as the official quantizer: that is the signal that teaches the transforms to shrink ranges)."""
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    fake_quant_act(x, 4).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    xmax, xmin = x_ref.amax(-1, keepdim=True).clamp(min=0), x_ref.amin(-1, keepdim=True).clamp(max=0)
    s = (xmax - xmin) / 15
    zp = torch.round(-xmin / s).detach()
    r = x_ref / s
    (((r + (torch.round(r) - r).detach() + zp).clamp(0, 15) - zp) * s).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad)
    inner = torch.ones_like(x, dtype=torch.bool)
    inner.scatter_(1, x.argmax(1, keepdim=True), False).scatter_(1, x.argmin(1, keepdim=True), False)
    assert torch.equal(x.grad[inner], torch.ones_like(x.grad[inner]))   # straight through
    assert (x.grad[~inner] - 1).abs().min() > 1e-3                         # the range's gradient

    x2 = torch.randn(4, 64, requires_grad=True)
    fake_quant_kv_int4(x2).sum().backward()
    assert torch.isfinite(x2.grad).all() and (x2.grad - 1).abs().max() > 1e-3


def test_warm_hadamard_is_traced_as_a_lookup(monkeypatch):
    """vLLM compiles the model and replays it in CUDA graphs, where a CPU->GPU copy of H_b is an
    error: after hadamard.warm (load time), the compiled transform must not build H_b again."""
    from ostquant_vllm import hadamard

    hadamard._SMALL_ON.clear()
    hadamard.warm(1536, 1, "cpu")
    x = torch.randn(3, 1536)
    ref = x.double() @ hadamard.hadamard_matrix(1536).double()
    monkeypatch.setattr(hadamard, "_small_hadamard", lambda b: (_ for _ in ()).throw(AssertionError("rebuilt")))
    torch._dynamo.reset()
    f = torch.compile(lambda t: hadamard.apply_hadamard(t), fullgraph=True)
    assert (f(x).double() - ref).abs().max() < 1e-5
