"""The reference integer GEMM against float64 math, the dispatch, and its fallbacks."""
import pytest
import torch

from ostquant_vllm import ops
from ostquant_vllm.hadamard import apply_hadamard
from ostquant_vllm.numerics import fake_quant_act, pack_int4, quantize_act


def make_weight(n, k, group=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    shape = (n,) if group <= 0 else (n, k // group)
    scale = (torch.rand(shape, generator=g) * 0.02 + 0.001).half()
    return levels, pack_int4(levels), scale


def dequant64(levels, scale, group):
    s = scale.double()
    s = s[:, None] if group <= 0 else s.repeat_interleave(group, 1)
    return levels.double() * s


@pytest.mark.parametrize("act_bits,sym,group", [(4, False, -1), (8, False, -1), (4, True, -1), (8, False, 32)])
def test_reference_gemm_matches_float64(act_bits, sym, group):
    n, k, m = 48, 256, 7
    levels, qw, scale = make_weight(n, k, group)
    x = torch.randn(m, k) * 3
    x[0] = 0.0  # an all-zero token
    p = ops.prepare_weights(qw, scale, act_bits, group, torch.float32)
    assert p.path == "reference_int"
    before = ops.CALLS["reference_int"]
    y = ops.linear(x, p, act_bits, sym, 1.0)
    assert ops.CALLS["reference_int"] == before + 1
    # float64: the dequantized activation levels times the dequantized weight
    q, a_scale, a_zero = quantize_act(x, act_bits, sym)
    xq = (q.double() - a_zero.double()) * a_scale.double()
    ref = xq @ dequant64(levels, scale, group).t()
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
    # and the fake-quant formulation calibration uses
    fq = fake_quant_act(x.double(), act_bits, sym) @ dequant64(levels, scale, group).t()
    torch.testing.assert_close(y.double(), fq, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_integer_accumulator_is_exact():
    """Worst case |acc| for K=14336 at 8-bit activations stays below 2^24: fp32 is exact."""
    k = 14336
    assert k * 128 * 8 < ops.FP32_EXACT_LIMIT
    levels = torch.full((2, k), -8, dtype=torch.int8)
    p = ops.prepare_weights(pack_int4(levels), torch.ones(2, dtype=torch.float16), 8, -1, torch.float32)
    q = torch.full((1, k), -128, dtype=torch.int8)
    y = ops.int_gemm_reference(q, torch.ones(1, 1), torch.zeros(1, 1), p, 8)
    assert y[0, 0].item() == k * 1024  # exact integer
    # past the bound the reference switches to float64 and stays exact
    k2 = 32768
    p2 = ops.prepare_weights(pack_int4(torch.full((1, k2), -8, dtype=torch.int8)),
                             torch.ones(1, dtype=torch.float16), 8, -1, torch.float32)
    y2 = ops.int_gemm_reference(torch.full((1, k2), -127, dtype=torch.int8), torch.ones(1, 1), torch.zeros(1, 1),
                                p2, 8)
    assert y2[0, 0].item() == k2 * 127 * 8


def test_hadamard_path_and_blocks():
    n, k = 16, 192
    levels, qw, scale = make_weight(n, k)
    x = torch.randn(5, k)
    p = ops.prepare_weights(qw, scale, 8, -1, torch.float32)
    y = ops.linear(x, p, 8, False, 1.0, hadamard_blocks=1)
    y_ref = ops.linear(apply_hadamard(x), p, 8, False, 1.0)
    torch.testing.assert_close(y, y_ref)
    y2 = ops.linear(x, p, 8, False, 1.0, hadamard_blocks=2)
    xb = apply_hadamard(x.view(5, 2, 96)).view(5, k)
    torch.testing.assert_close(y2, ops.linear(xb, p, 8, False, 1.0))


def test_a16_dequant_path():
    n, k = 16, 64
    levels, qw, scale = make_weight(n, k, 32)
    p = ops.prepare_weights(qw, scale, 16, 32, torch.float32)
    assert p.path == "dequant"
    x = torch.randn(3, k)
    torch.testing.assert_close(ops.linear(x, p, 16, False, 1.0), (x.double() @ dequant64(levels, scale, 32).t()).float())


def test_dispatch_falls_back_without_kernels(monkeypatch):
    ops._kernels.cache_clear()
    assert not ops.kernels_usable(torch.device("cpu"), -1, 4)

    class FakeKernels:
        @staticmethod
        def available():
            return False

    import sys

    monkeypatch.setitem(sys.modules, "ostquant_vllm.kernels", FakeKernels)
    ops._kernels.cache_clear()
    assert ops._kernels() is None
    ops._kernels.cache_clear()


def test_bf16_input_runs():
    levels, qw, scale = make_weight(32, 128)
    p = ops.prepare_weights(qw, scale, 4, -1, torch.bfloat16)
    y = ops.linear(torch.randn(2, 3, 128, dtype=torch.bfloat16), p, 4, False, 1.0)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 32) and torch.isfinite(y).all()


@pytest.mark.parametrize("act_bits,blocks", [(4, 1), (4, 8), (8, 0)])
def test_kernel_path_traces_under_torch_compile(act_bits, blocks):
    """vLLM compiles the model (fullgraph) and replays it in CUDA graphs: the kernel path must trace
    with no graph break and compute what the reference path does. Off the GPU the custom ops run
    their PyTorch fallbacks, so the traced graph is checked here; the CUDA side in tests/gpu."""
    from ostquant_vllm import kernels

    n, k = 64, 256
    levels, qw, scale = make_weight(n, k, seed=3)
    ref = ops.prepare_weights(qw, scale, act_bits, -1, torch.bfloat16)
    assert ref.path == "reference_int"
    kern = ops.Prepared("kernel", ref.w_scale, levels.sum(1, dtype=torch.int32), kernels.prepare_weight(qw), -1, k)
    x = torch.randn(5, k, dtype=torch.bfloat16) * 4
    torch._dynamo.reset()
    f = torch.compile(lambda t: ops.linear(t, kern, act_bits, False, 1.0, hadamard_blocks=blocks), fullgraph=True,
                      dynamic=True)
    before = ops.CALLS["kernel"]
    y = f(x)
    assert ops.CALLS["kernel"] == before  # the counter is not part of the traced graph
    y_eager = ops.linear(x, kern, act_bits, False, 1.0, hadamard_blocks=blocks)
    assert ops.CALLS["kernel"] == before + 1
    y_ref = ops.linear(x, ref, act_bits, False, 1.0, hadamard_blocks=blocks)
    assert y.dtype == torch.bfloat16 and y.shape == (5, n)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2 * y_ref.float().abs().max().item())
    assert f(torch.randn(9, k, dtype=torch.bfloat16)).shape == (9, n)  # another token count, same graph
