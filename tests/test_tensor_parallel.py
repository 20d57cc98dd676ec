"""Tensor parallelism on the CPU (no second device, no distributed group).

Each rank's share of a checkpoint is cut the way vLLM's weight loaders cut it (`split_*` below,
checked against the real loaders in test_vllm_loaders_cut_like_the_emulation), each rank computes
with the plugin's numerics (ostquant_vllm.ops, reference path), and the results are combined as
vLLM does: concatenation for the column-parallel q/k/v and gate/up, a sum (the all-reduce) for the
row-parallel o_proj and down_proj. Also: calibration's block-diagonal H_down, and the TP degrees a
checkpoint cannot serve.

Exactness: the per-channel reference GEMM multiplies integer levels in float32 exactly (ops.py)
and its epilogue is elementwise, so a column-parallel rank computes bit for bit the columns of the
unsharded output. With group scales the epilogue sums the groups' partials in float32, and W4A16
is a float GEMM, in an order that may depend on the number of output columns (measured: it does
for the group path): there, float32 round-off (rtol 1e-5).
A row-parallel rank quantizes only its slice of the input (what vLLM hands `apply`), so the sum
equals the per-rank-quantized reference up to float32 round-off of the epilogue and of the
all-reduce (rtol 1e-5), and differs from the full-row quantization that calibration used
(asserted, so the finding stays visible).
"""
import pytest
import torch

from ostquant_vllm import ops
from ostquant_vllm.format import CheckpointError, QuantFormat
from ostquant_vllm.numerics import fake_quant_kv_int4, pack_int4, quantize_act, unpack_int4
from ostquant_vllm.tensor_parallel import check_tensor_parallel, partition

torch.set_num_threads(1)

# A Llama-shaped layer that TP 8 can split: 8 query heads, 2 KV heads (replicated at TP 4 and 8),
# m = 384 = 8 blocks of 48 = 12 * 4 (a Paley H_12 times Sylvester's H_4).
D, NH, NKV, H, M, BLOCKS = 128, 8, 2, 16, 384, 8
SHAPES = {"q_proj": (NH * H, D), "k_proj": (NKV * H, D), "v_proj": (NKV * H, D), "o_proj": (D, NH * H),
          "gate_proj": (M, D), "up_proj": (M, D), "down_proj": (D, M)}
TPS = [1, 2, 4, 8]


# ------------------------------------------------------------------------------------------------
# vLLM's splitting, emulated (vllm/model_executor/parameter.py, layers/linear.py)
# ------------------------------------------------------------------------------------------------
def split_rows(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Column-parallel (load_column_parallel_weight / load_merged_column_weight / q of load_qkv_weight):
    rank r holds rows [r n/tp, (r+1) n/tp) of qweight and of weight_scale (per channel or group)."""
    n = t.shape[0] // tp
    return t.narrow(0, rank * n, n)


def split_kv(t: torch.Tensor, rank: int, tp: int, kv_heads: int) -> torch.Tensor:
    """k and v of QKVParallelLinear.load_qkv_weight: with tp >= kv_heads each KV head is replicated
    on tp / kv_heads consecutive ranks (shard rank // replicas)."""
    replicas = max(1, tp // kv_heads)
    return split_rows(t, rank // replicas, tp // replicas)


def split_cols(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Row-parallel (RowvLLMParameter.load_row_parallel_weight): narrow the input dim, i.e. qweight's
    packed in/2 and a group scale's in/group. A per-channel scale [out] (ChannelQuantScaleParameter,
    no input dim) is loaded whole on every rank. Also the activation slice a rank receives."""
    if t.dim() == 1:
        return t
    n = t.shape[-1] // tp
    return t.narrow(-1, rank * n, n)


def shard_layer(ckpt: dict, rank: int, tp: int, kv_heads: int = NKV) -> dict:
    """{vLLM module: (qweight, weight_scale)} of one rank, fused as vLLM fuses q/k/v and gate/up."""
    def cat(parts):
        return tuple(torch.cat(ts) for ts in zip(*parts))

    return {
        "qkv_proj": cat([[split_rows(t, rank, tp) for t in ckpt["q_proj"]],
                         [split_kv(t, rank, tp, kv_heads) for t in ckpt["k_proj"]],
                         [split_kv(t, rank, tp, kv_heads) for t in ckpt["v_proj"]]]),
        "gate_up_proj": cat([[split_rows(t, rank, tp) for t in ckpt[p]] for p in ("gate_proj", "up_proj")]),
        "o_proj": tuple(split_cols(t, rank, tp) for t in ckpt["o_proj"]),
        "down_proj": tuple(split_cols(t, rank, tp) for t in ckpt["down_proj"]),
    }


# ------------------------------------------------------------------------------------------------
# The plugin's computation
# ------------------------------------------------------------------------------------------------
def random_ckpt(fmt: QuantFormat, seed: int = 0) -> dict:
    """SPEC §7 tensors of one decoder layer: packed int4 qweight [out, in/2], fp16 weight_scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proj, (n, k) in SHAPES.items():
        levels = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        shape = (n,) if fmt.weight_group_size <= 0 else (n, k // fmt.weight_group_size)
        out[proj] = (pack_int4(levels), (torch.rand(shape, generator=g) * 0.02 + 0.001).half())
    return out


def run(x: torch.Tensor, qweight, scale, fmt: QuantFormat, hadamard_blocks: int = 0) -> torch.Tensor:
    """What OstQuantLinearMethod.apply computes on one rank (after process_weights_after_loading)."""
    p = ops.prepare_weights(qweight, scale, fmt.act_bits, fmt.weight_group_size, torch.float32)
    return ops.linear(x, p, fmt.act_bits, fmt.act_sym, fmt.act_clip, hadamard_blocks=hadamard_blocks)


def unsharded(ckpt: dict, fmt: QuantFormat, x_attn, x_o, x_ffn, x_down) -> dict:
    out = {p: run(x_attn, *ckpt[p], fmt) for p in ("q_proj", "k_proj", "v_proj")}
    out.update({p: run(x_ffn, *ckpt[p], fmt) for p in ("gate_proj", "up_proj")})
    out["o_proj"] = run(x_o, *ckpt["o_proj"], fmt)
    out["down_proj"] = run(x_down, *ckpt["down_proj"], fmt, partition(fmt, "down_proj", M, 1))
    return out


def inputs(seed: int = 1, tokens: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(tokens, k, generator=g) * 2 for k in (D, NH * H, D, M)]
    x[3][:, 5] += 40.0  # an outlier channel in down_proj's input (what H_down is for)
    return x


FORMATS = {
    "w4a4": QuantFormat(act_bits=4, hadamard_blocks=BLOCKS),
    "w4a8-g16": QuantFormat(act_bits=8, weight_group_size=16, hadamard_blocks=BLOCKS),   # group scales split by group
    "w4a16-g16": QuantFormat(act_bits=16, kv_bits=16, weight_group_size=16, hadamard_blocks=BLOCKS,
                             online_hadamard={"down_proj": False, "qk": False}),
}


def assert_same(a: torch.Tensor, b: torch.Tensor, fmt: QuantFormat) -> None:
    if fmt.weight_group_size <= 0 and fmt.act_bits < 16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_column_parallel_is_exact(name, tp):
    """q/k/v and gate/up: every rank's output is its columns of the unsharded output (bit for bit
    per channel, see the module docstring)."""
    fmt = FORMATS[name]
    ckpt = random_ckpt(fmt)
    x_attn, x_o, x_ffn, x_down = inputs()
    full = unsharded(ckpt, fmt, x_attn, x_o, x_ffn, x_down)
    for rank in range(tp):
        local = shard_layer(ckpt, rank, tp)
        qkv = run(x_attn, *local["qkv_proj"], fmt)        # the input is replicated: the whole row
        want = torch.cat([split_rows(full["q_proj"].t(), rank, tp), split_kv(full["k_proj"].t(), rank, tp, NKV),
                          split_kv(full["v_proj"].t(), rank, tp, NKV)]).t()
        assert_same(qkv, want, fmt)
        gu = run(x_ffn, *local["gate_up_proj"], fmt)
        want = torch.cat([split_rows(full[p].t(), rank, tp) for p in ("gate_proj", "up_proj")]).t()
        assert_same(gu, want, fmt)


def rank_reference(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """float64: one rank's slice quantized per token on its own, times its dequantized weight slice."""
    s = scale.double()
    w = levels.double() * (s[:, None] if fmt.weight_group_size <= 0 else s.repeat_interleave(fmt.weight_group_size, 1))
    if fmt.act_bits < 16:
        q, a_scale, a_zero = quantize_act(x, fmt.act_bits, fmt.act_sym, fmt.act_clip)
        x = (q.double() - a_zero.double()) * a_scale.double()
    return x.double() @ w.t()


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_row_parallel_quantizes_each_rank_slice(name, tp):
    """o_proj and down_proj: the all-reduced sum of the ranks equals the per-rank-quantized reference;
    down_proj's ranks apply I_{b/tp} (x) H_{m/b} to their own slices."""
    fmt = FORMATS[name]
    ckpt = random_ckpt(fmt)
    x_attn, x_o, x_ffn, x_down = inputs()
    full = unsharded(ckpt, fmt, x_attn, x_o, x_ffn, x_down)
    had = fmt.online_hadamard["down_proj"]
    x_down_rot = ops.hadamard_input(x_down, BLOCKS) if had else x_down    # the calibrated model's x H_down
    for proj, x in (("o_proj", x_o), ("down_proj", x_down)):
        blocks = partition(fmt, proj, x.shape[-1], tp)
        assert blocks == (BLOCKS // tp if proj == "down_proj" and had else 0)
        total = torch.zeros_like(full[proj], dtype=torch.float64)
        ref = torch.zeros_like(total)
        for rank in range(tp):
            qw, sc = shard_layer(ckpt, rank, tp)[proj]
            x_r = split_cols(x, rank, tp)
            if blocks:  # the rank's own Hadamard is the slice of the full block-diagonal one, bit for bit
                assert torch.equal(ops.hadamard_input(x_r, blocks), split_cols(x_down_rot, rank, tp))
            total += run(x_r, qw, sc, fmt, blocks).double()
            x_rot = split_cols(x_down_rot, rank, tp) if blocks else x_r
            ref += rank_reference(x_rot, unpack_int4(qw), sc, fmt)
        tol = dict(rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(total, ref, **tol)
        if tp == 1:
            assert torch.equal(total.float(), full[proj])
        elif fmt.act_bits >= 16:  # no activation quantizer: the split is exact up to summation order
            torch.testing.assert_close(total, full[proj].double(), **tol)
        else:  # per-rank activation scales: not the full-row quantization calibration used
            assert not torch.allclose(total, full[proj].double(), **tol)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_rank_activation_scale_never_coarser(tp):
    """Consequence of per-rank quantization: each rank's slice spans at most the full row's range
    (asymmetric ranges include 0), so its step is never larger than calibration's full-row step."""
    x = ops.hadamard_input(inputs()[3], BLOCKS)
    _, full_scale, _ = quantize_act(x, 4)
    for rank in range(tp):
        _, s, _ = quantize_act(split_cols(x, rank, tp), 4)
        assert (s <= full_scale).all()


@pytest.mark.parametrize("tp", TPS)
def test_int4_kv_cache_splits_by_head(tp):
    """vLLM's int4 KV cache quantizes per (token, head) after a per-head rotation: a rank's KV heads
    (whole, or replicated when tp > kv heads) see exactly what they see unsharded."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(5, NKV, 64, generator=g).to(torch.bfloat16)
    full = fake_quant_kv_int4(kv, torch.bfloat16)
    for rank in range(tp):
        local = split_kv(kv.transpose(0, 1), rank, tp, NKV).transpose(0, 1)
        assert torch.equal(fake_quant_kv_int4(local, torch.bfloat16),
                           split_kv(full.transpose(0, 1), rank, tp, NKV).transpose(0, 1))


# ------------------------------------------------------------------------------------------------
# TP degrees a checkpoint cannot serve
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_kw,proj,in_features,tp,match", [
    (dict(hadamard_blocks=1), "down_proj", M, 2, r"quantization_config\.hadamard_blocks=1: tensor parallel size 2"),
    (dict(hadamard_blocks=8), "down_proj", M, 3, r"quantization_config\.hadamard_blocks=8: tensor parallel size 3"),
    (dict(hadamard_blocks=8, weight_group_size=32), "down_proj", 192, 4,
     r"quantization_config\.weight_group_size=32: tensor parallel size 4 gives each rank 48 input columns"),
    (dict(), "o_proj", 12, 4, r"o_proj\.qweight: tensor parallel size 4 gives each rank 3 input columns, an odd"),
    (dict(hadamard_blocks=64), "down_proj", 192, 1, r"quantization_config\.hadamard_blocks=64: .*order 3"),
])
def test_unservable_tp_is_refused(fmt_kw, proj, in_features, tp, match):
    fmt = QuantFormat(**fmt_kw)
    with pytest.raises(CheckpointError, match=match):
        partition(fmt, f"model.layers.0.mlp.{proj}", in_features, tp)


def test_default_model_geometry():
    """SmolLM2-135M (d 576, m 1536 = 8 * 192 = 8 * 12 * 16): hadamard_blocks 8 splits at TP 1, 2, 4, 8;
    the default (1, the full H_1536) only at TP 1. (vLLM itself further needs TP | 9 heads.)"""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=1)
    for tp in TPS:
        check_tensor_parallel(cfg, QuantFormat(hadamard_blocks=8), tp)
    check_tensor_parallel(cfg, QuantFormat(), 1)
    with pytest.raises(CheckpointError, match=r"hadamard_blocks=1: tensor parallel size 2 .*down_proj"):
        check_tensor_parallel(cfg, QuantFormat(), 2)


# ------------------------------------------------------------------------------------------------
# Calibration's block-diagonal H_down
# ------------------------------------------------------------------------------------------------
def test_block_hadamard_is_the_plugins():
    """calibrate's QuantLinear, transforms' fused matrix and the plugin apply the same I_b (x) H_{m/b}."""
    from calibrate.qmodel import QuantLinear, QuantSettings
    from ostquant_vllm.hadamard import hadamard_matrix

    Hb = hadamard_matrix(M, blocks=BLOCKS)
    assert torch.allclose(Hb @ Hb.t(), torch.eye(M, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Hb[:48, 48:], torch.zeros(48, M - 48, dtype=torch.float64))   # block diagonal
    x = torch.randn(3, M, dtype=torch.float64)
    lin = QuantLinear(torch.nn.Linear(M, 4), QuantSettings(), hadamard=BLOCKS)
    torch.testing.assert_close(lin.rotate_input(x), x @ Hb, rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.hadamard_input(x.float(), BLOCKS), (x @ Hb).float(), rtol=0, atol=1e-5)


def test_block_hadamard_fused_model_is_the_float_model():
    """Every pair with H_down = I_8 (x) H_48 fused, quantizers off, online block H on: the logits are
    the float model's (as test_equivalence for the full H)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from calibrate.fuse import fuse, transformable_weights
    from calibrate.prepare import prepare
    from calibrate.qmodel import QuantSettings, quantize_model
    from calibrate.transforms import Geometry, Transforms, womi_ov, womi_residual

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=M, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=300, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits.double()
    prepare(model)
    g, gen = Geometry.of(model.config), torch.Generator().manual_seed(1)
    w = transformable_weights(model)
    T = Transforms(g, r_res=womi_residual(w, g, gen), r_ov=womi_ov(w, g, gen), learn_rotations=True, scales=True,
                   scale_qk=True, had_down=BLOCKS)
    with torch.no_grad():
        for p in T.scale_parameters():
            p.normal_(0, 0.5)
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    fuse(model, T)
    quantize_model(model, QuantSettings(), had_down=T.had_down)
    assert model.model.layers[0].mlp.down_proj.hadamard == BLOCKS
    with torch.no_grad():
        out = model(ids).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, down)


def test_transforms_refuse_blocks_without_hadamard():
    from calibrate.transforms import Geometry, Transforms

    g = Geometry(layers=1, d=64, heads=4, kv_heads=2, h=16, m=M)
    with pytest.raises(ValueError, match="hadamard_blocks=5"):
        Transforms(g, r_res=None, r_ov=None, learn_rotations=False, scales=False, scale_qk=False, had_down=5)


def test_hadamard_blocks_reach_the_checkpoint(tmp_path, monkeypatch, capsys):
    """--hadamard-blocks -> CalibConfig -> quantization_config -> load_fake_quant_model's down_proj."""
    import calibrate.pipeline as pipeline
    from calibrate.cli import main
    from calibrate.qmodel import load_fake_quant_model
    from conftest import export_tiny

    seen = {}

    def fake_calibrate(cfg, *args, **kwargs):   # the CLI's config, without running the recipe
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(pipeline, "calibrate", fake_calibrate)
    assert main(["calibrate", "--hadamard-blocks", "8"]) == 0
    assert seen["cfg"].hadamard_blocks == 8 and seen["cfg"].quant_format().hadamard_blocks == 8
    # the default (0) resolves from the intermediate size: 8 blocks where they exist, so TP 1, 2, 4, 8
    assert pipeline.CalibConfig().quant_format(1536).hadamard_blocks == 8      # SmolLM2: 8 x (12 * 16)
    assert pipeline.CalibConfig().quant_format(14336).hadamard_blocks == 8     # Llama-3-8B: 8 x (28 * 64)
    assert pipeline.CalibConfig().quant_format(28672).hadamard_blocks == 8     # Llama-3-70B: 8 x (28 * 128)
    assert pipeline.CalibConfig().quant_format(8 * 43).hadamard_blocks == 1    # no H_43, H_86, H_172: 1 (an
    #                                                                               error later, naming the size)
    assert pipeline.CalibConfig(hadamard_blocks=1).quant_format(1536).hadamard_blocks == 1
    capsys.readouterr()

    ckpt = export_tiny(str(tmp_path / "b8"), "w4a4kv4", hadamard_blocks=8)   # m = 192: 8 blocks of 24
    model = load_fake_quant_model(ckpt)
    assert model.ostquant_format.hadamard_blocks == 8
    assert {layer.mlp.down_proj.hadamard for layer in model.model.layers} == {8}
    assert {layer.mlp.up_proj.hadamard for layer in model.model.layers} == {0}


# ------------------------------------------------------------------------------------------------
# The real vLLM layers and loaders, one rank at a time
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_tp():
    """Build vLLM's parallel linears as rank `state['rank']` of `state['tp']`: the TP rank/size
    lookups of vLLM's linear and parameter modules are redirected (no process group is needed to
    construct layers and run their weight loaders; the collectives are done here by hand)."""
    pytest.importorskip("vllm")
    import ostquant_vllm
    import vllm.model_executor.layers.linear as L
    import vllm.model_executor.parameter as P
    from vllm.config import VllmConfig, set_current_vllm_config

    ostquant_vllm.register()
    state = {"rank": 0, "tp": 1}
    mp = pytest.MonkeyPatch()
    for mod in (L, P):
        mp.setattr(mod, "get_tensor_model_parallel_rank", lambda: state["rank"])
        mp.setattr(mod, "get_tensor_model_parallel_world_size", lambda: state["tp"])
    with set_current_vllm_config(VllmConfig()):
        yield L, state
    mp.undo()


def vllm_layers(L, fmt, ckpt, d, m, heads, kv_heads, h):
    """The four parallel linears of a Llama layer on the current rank, loaded tensor by tensor as
    vLLM's LlamaModel.load_weights does (q/k/v and gate/up by shard id)."""
    from ostquant_vllm.config import OstQuantConfig

    qc = OstQuantConfig(fmt)
    pre = "model.layers.0"
    layers = {
        "qkv_proj": L.QKVParallelLinear(d, h, heads, kv_heads, bias=False, quant_config=qc,
                                        prefix=f"{pre}.self_attn.qkv_proj"),
        "o_proj": L.RowParallelLinear(heads * h, d, bias=False, quant_config=qc, prefix=f"{pre}.self_attn.o_proj"),
        "gate_up_proj": L.MergedColumnParallelLinear(d, [m, m], bias=False, quant_config=qc,
                                                     prefix=f"{pre}.mlp.gate_up_proj"),
        "down_proj": L.RowParallelLinear(m, d, bias=False, quant_config=qc, prefix=f"{pre}.mlp.down_proj"),
    }
    loads = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
             ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1), ("o_proj", "o_proj", None),
             ("down_proj", "down_proj", None)]
    for module, proj, shard in loads:
        layer = layers[module]
        for pname, t in zip(("qweight", "weight_scale"), ckpt[proj]):
            param = getattr(layer, pname)
            param.weight_loader(param, t, *(() if shard is None else (shard,)))
    for layer in layers.values():
        layer.loaded_qweight = layer.qweight.data.clone()  # as loaded: processing frees it
        layer.quant_method.process_weights_after_loading(layer)
    return layers


def tiny_ckpt_tensors(folder):
    from safetensors.torch import load_file

    sd = load_file(f"{folder}/model.safetensors")
    pre = "model.layers.0"
    return {p: (sd[f"{pre}.{blk}.{p}.qweight"], sd[f"{pre}.{blk}.{p}.weight_scale"])
            for p, blk in [(p, "self_attn") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + [(p, "mlp") for p in ("gate_proj", "up_proj", "down_proj")]}


@pytest.mark.parametrize("preset,tps", [("w4a4kv4", [1, 2, 4]), ("w4a16", [1, 2])])
def test_vllm_loaders_cut_like_the_emulation(vllm_tp, tmp_path, preset, tps):
    """SPEC §7 tensors of an exported tiny checkpoint (d 128, 4 heads, 2 KV heads, m 192, 8 H_down
    blocks; w4a16: group 32) through the real QKV / MergedColumn / RowParallelLinear loaders: each
    rank holds exactly the emulated shard, and each layer's `apply` on its rank's input is the
    emulated rank's computation, bit for bit."""
    from conftest import TINY, export_tiny
    from ostquant_vllm.format import read_quant_format

    L, state = vllm_tp
    folder = export_tiny(str(tmp_path / preset), preset, hadamard_blocks=8)
    ckpt, fmt = tiny_ckpt_tensors(folder), read_quant_format(folder)
    d, m, h = TINY["hidden_size"], TINY["intermediate_size"], TINY["head_dim"]
    nh, nkv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)
    x = {"qkv_proj": torch.randn(4, d, generator=g), "o_proj": torch.randn(4, nh * h, generator=g),
         "gate_up_proj": torch.randn(4, d, generator=g), "down_proj": torch.randn(4, m, generator=g)}
    for tp in tps:
        for rank in range(tp):
            state.update(tp=tp, rank=rank)
            layers = vllm_layers(L, fmt, ckpt, d, m, nh, nkv, h)
            want = shard_layer(ckpt, rank, tp, nkv)
            blocks = 8 // tp if fmt.online_hadamard["down_proj"] else 0
            assert layers["down_proj"].ostq_hadamard_blocks == blocks
            for module, layer in layers.items():
                assert torch.equal(layer.loaded_qweight, want[module][0]), (tp, rank, module)
                assert torch.equal(layer.weight_scale.data, want[module][1]), (tp, rank, module)
                inp = split_cols(x[module], rank, tp) if module in ("o_proj", "down_proj") else x[module]
                assert torch.equal(layer.quant_method.apply(layer, inp),
                                   run(inp, *want[module], fmt, blocks if module == "down_proj" else 0))
    # A TP degree the checkpoint cannot serve fails while vLLM builds the layer, before any tensor is read.
    from ostquant_vllm.config import OstQuantConfig

    state.update(tp=2, rank=0)
    full_h = OstQuantConfig(read_quant_format(export_tiny(str(tmp_path / "b1"), "w4a4kv4")))   # hadamard_blocks 1
    with pytest.raises(CheckpointError, match=r"quantization_config\.hadamard_blocks=1: tensor parallel size 2 "
                                              r"cannot split the online Hadamard of model\.layers\.0\.mlp\.down_proj"):
        L.RowParallelLinear(m, d, bias=False, quant_config=full_h, prefix="model.layers.0.mlp.down_proj")
    state.update(tp=1, rank=0)


def test_widened_heads_compute_the_same_model(tmp_path):
    """tests/gpu/vllm_tp.py widens the default model (9 query / 3 KV heads, which vLLM cannot split over
    2 ranks) by storing every head twice and zeroing o_proj's columns of the copies. That transform must be
    exact: calibration's fake-quant model of the widened checkpoint gives the original's logits (KV int4
    quantizer, o_proj's per-token activation quantizer and all)."""
    import importlib.util
    import os

    from calibrate.qmodel import load_fake_quant_model
    from conftest import export_tiny

    spec = importlib.util.spec_from_file_location("vllm_tp", os.path.join(os.path.dirname(__file__), "gpu", "vllm_tp.py"))
    vllm_tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vllm_tp)
    src = export_tiny(str(tmp_path / "src"), "w4a4kv4", hadamard_blocks=8)
    wide = vllm_tp.widen_heads(src, str(tmp_path / "wide"))
    # float64: o_proj's extra zero columns change a float32 GEMM's summation (BLAS-dependent, 1e-6), and
    # the 4-bit quantizers downstream turn such round-off into level flips; in float64 it stays below them
    a, b = load_fake_quant_model(src, dtype=torch.float64), load_fake_quant_model(wide, dtype=torch.float64)
    assert (b.config.num_attention_heads, b.config.num_key_value_heads) == (8, 4)
    ids = torch.randint(10, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5 * la.abs().max().item())
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    for tp in (2, 4):  # and its linears split as the GPU run needs
        check_tensor_parallel(b.config, QuantFormat(hadamard_blocks=8), tp)
