"""The LinearMethod inside real vLLM layers: fused shard placement, the counting loaders' errors,
dummy weights. Builds QKVParallelLinear / MergedColumnParallelLinear / RowParallelLinear in a
one-process (gloo) model-parallel group."""
import pytest
import torch

pytest.importorskip("vllm")

from ostquant_vllm.format import CheckpointError, QuantFormat  # noqa: E402
from ostquant_vllm.numerics import dequantize_weight, pack_int4, unpack_int4  # noqa: E402

D, H, NH, NKV, M = 128, 64, 4, 2, 192


@pytest.fixture(scope="module")
def vctx():
    import ostquant_vllm
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from conftest import free_port

    ostquant_vllm.register()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
    cleanup_dist_env_and_memory()


def make_layer(kind, fmt=None):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from ostquant_vllm.config import OstQuantConfig

    qc = OstQuantConfig(fmt or QuantFormat(act_bits=8))
    if kind == "qkv":
        return QKVParallelLinear(D, H, NH, NKV, bias=False, quant_config=qc, prefix="model.layers.0.self_attn.qkv_proj")
    if kind == "gate_up":
        return MergedColumnParallelLinear(D, [M, M], bias=False, quant_config=qc, prefix="model.layers.0.mlp.gate_up_proj")
    return RowParallelLinear(M, D, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj")


def rand_q(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-8, 8, (out, inp), generator=g, dtype=torch.int8)
    scale = (torch.rand(out, generator=g) * 0.05 + 0.01).half()
    return levels, scale


def load(layer, shard_tensors):
    for shard, (levels, scale) in shard_tensors.items():
        args = () if shard is None else (shard,)
        layer.qweight.weight_loader(layer.qweight, pack_int4(levels), *args)
        layer.weight_scale.weight_loader(layer.weight_scale, scale, *args)


def levels_of(layer) -> torch.Tensor:
    """int4 levels [N, K] the forward uses (the reference path's prepared fp32 [K, N])."""
    p = layer.ostq_prepared
    assert p.path == "reference_int"
    return p.weight.t().to(torch.int8)


def test_fused_shards_land_right(vctx):
    qkv = make_layer("qkv")
    shards = {"q": rand_q(NH * H, D, 1), "k": rand_q(NKV * H, D, 2), "v": rand_q(NKV * H, D, 3)}
    load(qkv, {s: shards[s] for s in ("v", "q", "k")})  # order of arrival must not matter
    qkv.quant_method.process_weights_after_loading(qkv)
    full_levels = torch.cat([shards[s][0] for s in "qkv"])
    full_scale = torch.cat([shards[s][1] for s in "qkv"])
    assert torch.equal(levels_of(qkv), full_levels)
    assert qkv.qweight.numel() == 0  # the checkpoint layout is freed once the prepared copy exists
    assert torch.equal(qkv.weight_scale.data, full_scale)
    x = torch.randn(3, D)
    y = qkv(x)[0] if isinstance(qkv(x), tuple) else qkv(x)
    w = dequantize_weight(full_levels, full_scale)
    from ostquant_vllm.numerics import fake_quant_act
    torch.testing.assert_close(y, fake_quant_act(x, 8) @ w.t(), rtol=1e-4, atol=1e-4)

    gu = make_layer("gate_up")
    sh = {0: rand_q(M, D, 4), 1: rand_q(M, D, 5)}
    load(gu, {1: sh[1], 0: sh[0]})
    gu.quant_method.process_weights_after_loading(gu)
    assert torch.equal(levels_of(gu), torch.cat([sh[0][0], sh[1][0]]))
    assert torch.equal(gu.weight_scale.data, torch.cat([sh[0][1], sh[1][1]]))


def test_missing_shard_named(vctx):
    qkv = make_layer("qkv")
    load(qkv, {"q": rand_q(NH * H, D, 1), "v": rand_q(NKV * H, D, 3)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.qweight is missing"):
        qkv.quant_method.process_weights_after_loading(qkv)


def test_wrong_dtype_and_shape_named(vctx):
    down = make_layer("down")
    levels, scale = rand_q(D, M, 1)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale has dtype torch\.float32"):
        down.weight_scale.weight_loader(down.weight_scale, scale.float())
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight has shape \[128, 48\], "
                                              r"expected \[128, 96\]"):
        down.qweight.weight_loader(down.qweight, pack_int4(levels)[:, :48])
    gu = make_layer("gate_up")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.qweight has dtype torch\.int32"):
        gu.qweight.weight_loader(gu.qweight, pack_int4(rand_q(M, D, 1)[0]).int(), 1)


def test_duplicate_named(vctx):
    down = make_layer("down")
    levels, scale = rand_q(D, M, 1)
    load(down, {None: (levels, scale)})
    with pytest.raises(CheckpointError, match="down_proj.qweight was loaded twice"):
        down.qweight.weight_loader(down.qweight, pack_int4(levels))


def test_down_proj_hadamard_and_group_scales(vctx):
    fmt = QuantFormat(act_bits=8, weight_group_size=32)
    down = make_layer("down", fmt)
    assert down.weight_scale.shape == (D, M // 32)
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(-8, 8, (D, M), generator=g, dtype=torch.int8)
    scale = (torch.rand(D, M // 32, generator=g) * 0.05 + 0.01).half()
    load(down, {None: (levels, scale)})
    down.quant_method.process_weights_after_loading(down)
    x = torch.randn(4, M)
    y = down(x)
    y = y[0] if isinstance(y, tuple) else y
    from ostquant_vllm.hadamard import apply_hadamard
    from ostquant_vllm.numerics import fake_quant_act
    ref = fake_quant_act(apply_hadamard(x.double()), 8) @ dequantize_weight(levels, scale, 32).double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_dummy_weights_finite(vctx):
    qkv = make_layer("qkv")
    qkv.ostq_dummy = True
    qkv.weight_scale.data.uniform_(-1e-3, 1e-3)
    qkv.quant_method.process_weights_after_loading(qkv)
    assert levels_of(qkv).float().std() > 1  # random nibbles, not zeros
    y = qkv(torch.randn(5, D) * 10)
    y = y[0] if isinstance(y, tuple) else y
    assert torch.isfinite(y).all() and y.abs().sum() > 0
