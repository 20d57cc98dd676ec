"""The RMSNorm + quantize graph pass (ostquant_vllm/fusion.py) on traced graphs of vLLM's IR ops, on the CPU.

The rewritten graph must compute what the original computed (the fused op's CPU path is the reference of the
CUDA kernel), take exactly the pairs it may (not a norm whose output has another user, not the Hadamard
quantizer), and carry the fake values Inductor reads.
"""
from __future__ import annotations

import operator
import types

import pytest
import torch

pytest.importorskip("vllm")
import vllm.ir.ops  # noqa: F401,E402  (registers torch.ops.vllm_ir)
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from ostquant_vllm import fusion, ops  # noqa: E402
from ostquant_vllm.kernels import reference  # noqa: E402  (registers torch.ops.ostquant)

EPS = 1e-5
K = 64


def _layer(x, res, w1, w2, w3):
    """Three norms as in a decoder: fused add + norm -> qkv quantizer (through a view), a first-layer norm ->
    quantizer, and a norm whose output also feeds something else (must stay)."""
    y, res2 = torch.ops.vllm_ir.fused_add_rms_norm.default(x, res, w1, EPS, None)
    q1, s1, z1 = torch.ops.ostquant.quantize_act.default(y.reshape(-1, K), 4, False, 1.0, 0)
    y2 = torch.ops.vllm_ir.rms_norm.default(res2, w2, EPS, None)
    q2, s2, z2 = torch.ops.ostquant.quantize_act.default(y2, 8, True, 0.9, 0)
    y3 = torch.ops.vllm_ir.rms_norm.default(x, w3, EPS, None)
    q3, s3, z3 = torch.ops.ostquant.quantize_act.default(y3, 4, False, 1.0, 0)
    q4, s4, z4 = torch.ops.ostquant.quantize_act.default(res2, 4, False, 1.0, 2)  # Hadamard: not a norm's
    return q1, s1, z1, res2 * 2, q2, s2, z2, q3, s3, z3, y3 + 1, q4, s4, z4


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(7, K, generator=g).to(torch.bfloat16) for _ in range(2))
    w1, w2, w3 = (torch.rand(K, generator=g).add(0.5).to(torch.bfloat16) for _ in range(3))
    return x, res, w1, w2, w3


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_pass_fuses_the_pairs_and_computes_the_same():
    args = _inputs()
    gm = make_fx(_layer, tracing_mode="fake")(*args)
    want = gm(*args)
    before = ops.CALLS["fused_rms_norm_quant"]
    assert fusion.fuse_norm_quant(gm.graph) == 2
    assert ops.CALLS["fused_rms_norm_quant"] == before + 2
    gm.graph.lint()
    gm.recompile()
    t = _targets(gm)
    assert t.count("ostquant.rms_norm_quant.default") == 2
    assert t.count("ostquant.quantize_act.default") == 2  # the norm with a second user, the Hadamard one
    assert "vllm_ir.fused_add_rms_norm.default" not in t and t.count("vllm_ir.rms_norm.default") == 1
    for n in gm.graph.nodes:
        if str(n.target) == "ostquant.rms_norm_quant.default":
            v = n.meta["val"]
            assert [tuple(a.shape) for a in v[:3]] == [(7, K), (7, 1), (7, 1)] and v[0].dtype == torch.int8
    got = gm(*args)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and against the reference written out: the first pair's levels and the residual
    q, s, z, r = reference.rms_norm_quant_ref(args[0], args[1], args[2], EPS, 4)
    assert torch.equal(got[0], q) and torch.equal(got[1], s) and torch.equal(got[3], r * 2)


def test_pass_leaves_graphs_without_the_pattern():
    def f(x, w):
        y = torch.ops.vllm_ir.rms_norm.default(x, w, EPS, None)
        return y * 3, torch.ops.ostquant.quantize_act.default(x, 4, False, 1.0, 0)[0]

    x, _, w, _, _ = _inputs(1)
    gm = make_fx(f, tracing_mode="fake")(x, w)
    t0 = _targets(gm)
    assert fusion.fuse_norm_quant(gm.graph) == 0
    assert _targets(gm) == t0


def test_fused_op_reference_matches_vllm_norm_then_quantizer():
    x, res, w, _, _ = _inputs(2)
    y, r = torch.ops.vllm_ir.fused_add_rms_norm.default(x, res, w, EPS, None)
    q, s, z = torch.ops.ostquant.quantize_act.default(y, 4, False, 1.0, 0)
    fq, fs, fz, fr = torch.ops.ostquant.rms_norm_quant.default(x, res, w, EPS, 4, False, 1.0)
    assert torch.equal(r, fr) and torch.equal(q, fq) and torch.equal(s, fs) and torch.equal(z, fz)
    fq, fs, fz, fr = torch.ops.ostquant.rms_norm_quant.default(x, None, None, EPS, 8, True, 1.0)
    q, s, z = torch.ops.ostquant.quantize_act.default(torch.ops.vllm_ir.rms_norm.default(x, None, EPS, None),
                                                       8, True, 1.0, 0)
    assert fr.numel() == 0 and torch.equal(q, fq) and torch.equal(s, fs)


def test_install_takes_the_free_slot_only(monkeypatch):
    from vllm.config.utils import normalize_value

    fmt = types.SimpleNamespace(weight_group_size=-1, act_bits=4)
    monkeypatch.setattr(fusion, "FUSE_NORM", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "kernels_usable", lambda *a: True)
    cfg = types.SimpleNamespace(compilation_config=types.SimpleNamespace(inductor_compile_config={}))
    assert fusion.install(cfg, fmt)
    icc = cfg.compilation_config.inductor_compile_config
    (key, p), = icc.items()
    assert isinstance(p.uuid(), str) and dict(normalize_value(icc))[key] == p.uuid()  # vLLM's config hash takes it
    assert fusion.install(cfg, fmt) and icc[key] is p  # once
    other = types.SimpleNamespace(uuid=lambda: "x")
    icc[key] = other
    assert not fusion.install(cfg, fmt) and icc[key] is other  # someone else's pass stays
    monkeypatch.setattr(fusion, "FUSE_NORM", False)
    monkeypatch.setattr(fusion, "FUSE_SILU", False)
    assert not fusion.install(types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        inductor_compile_config={})), fmt)
    monkeypatch.setattr(fusion, "FUSE_SILU", True)
    assert fusion.install(types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        inductor_compile_config={})), fmt)
    monkeypatch.setattr(ops, "kernels_usable", lambda *a: False)  # the reference path: nothing to fuse
    assert not fusion.install(types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        inductor_compile_config={})), fmt)


def test_pass_moves_the_residual_users():
    """fused_add_rms_norm's residual feeds later ops: after the rewrite they read the fused op's copy."""
    gm = make_fx(_layer, tracing_mode="fake")(*_inputs())
    fusion.fuse_norm_quant(gm.graph)
    fused = [n for n in gm.graph.nodes if str(n.target) == "ostquant.rms_norm_quant.default"]
    res_users = [u for u in fused[0].users if u.args[1] == 3]
    assert res_users and all(u.target is operator.getitem for u in res_users)
    assert len(res_users[0].users) >= 2  # the output (res2 * 2), the second norm, the Hadamard quantizer


def _mlp_tail(gu, d: int, blocks: int):
    """vLLM's native SiluAndMul, then down_proj's Hadamard quantizer (through a view, as ops.linear reshapes)."""
    y = torch.nn.functional.silu(gu[..., :d]) * gu[..., d:]
    q, s, z = torch.ops.ostquant.quantize_act.default(y.reshape(-1, d), 4, False, 1.0, blocks)
    return q, s, z


@pytest.mark.parametrize("d,blocks,fused", [(1536, 8, True), (1536, 0, False), (64, 1, False)])
def test_pass_fuses_silu_mul_into_the_hadamard_quantizer(d, blocks, fused):
    """SmolLM2's down_proj input (1536 = 8 blocks of 12 * 16) is the CUDA kernel's shape; a plain quantizer and a
    K the kernel does not take stay as they are."""
    from ostquant_vllm import kernels

    assert kernels.silu_mul_quant_fusable(d, blocks) == fused
    gu = (torch.randn(5, 2 * d, generator=torch.Generator().manual_seed(d)) * 2).to(torch.bfloat16)
    gm = make_fx(lambda t: _mlp_tail(t, d, blocks), tracing_mode="fake")(gu)
    want = gm(gu)
    assert fusion.fuse_silu_quant(gm.graph) == int(fused)
    gm.graph.lint()
    gm.recompile()
    t = _targets(gm)
    assert ("ostquant.silu_mul_quantize_act.default" in t) == fused
    assert ("aten.silu.default" in t) != fused and ("ostquant.quantize_act.default" in t) != fused
    got = gm(gu)
    if not fused:
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        return
    node = next(n for n in gm.graph.nodes if str(n.target) == "ostquant.silu_mul_quantize_act.default")
    assert [tuple(v.shape) for v in node.meta["val"]] == [(5, d), (5, 1), (5, 1)]
    ref = reference.silu_mul_quantize_act_ref(gu, 4, False, 1.0, blocks)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # against the eager graph (silu rounded to bf16 before the product; a row's zero point can move by one):
    # the dequantized values within one quantization step
    deq = [(q.float() - z) * sc for q, sc, z in (got, want)]
    assert bool(((deq[0] - deq[1]).abs() <= 1.01 * got[1]).all())
