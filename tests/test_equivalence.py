"""SPEC §2-§3: preparation and every equivalence pair leave the float model's logits unchanged
(relative error < 1e-4 in float32): on the real default model and real text, and on random
Qwen2 (q/k/v biases) and Qwen3 (q/k norms, S_qk off) configs."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from calibrate.fuse import fuse, transformable_weights
from calibrate.prepare import prepare
from calibrate.qmodel import QuantSettings, quantize_model
from calibrate.transforms import Geometry, Transforms, womi_ov, womi_residual

PAIRS = ["r_res", "s_attn_ffn", "ov", "qk", "up_down", "had_down", "all"]


def _transforms(model, pair: str, qk_scale: bool = True) -> Transforms:
    g = Geometry.of(model.config)
    gen = torch.Generator().manual_seed(1)
    w = transformable_weights(model)
    on = lambda *names: pair == "all" or pair in names  # noqa: E731
    T = Transforms(g, r_res=womi_residual(w, g, gen) if on("r_res") else None,
                   r_ov=womi_ov(w, g, gen) if on("ov") else None, learn_rotations=True,
                   scales=True, scale_qk=qk_scale, had_down=on("had_down"))
    with torch.no_grad():  # random positive scales on the pairs under test, identity elsewhere
        for name, p in T.named_parameters():
            if name.startswith("log_s"):
                kind = {"log_s_attn": "s_attn_ffn", "log_s_ffn": "s_attn_ffn", "log_s_ov": "ov",
                        "log_s_qk": "qk", "log_s_up_down": "up_down"}[name]
                p.normal_(0, 0.5) if on(kind) else p.zero_()
    return T


def _check(model, ids, pair, qk_scale=True):
    with torch.no_grad():
        ref = model(ids).logits.double()
    T = _transforms(model, pair, qk_scale)
    fuse(model, T)
    quantize_model(model, QuantSettings(), had_down=T.had_down)  # quantizers off (16 bits), online H on
    with torch.no_grad():
        out = model(ids).logits.double()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"{pair}: relative logits error {rel:.2e}"
    return rel


@pytest.fixture(scope="module")
def default_model_dir():
    from calibrate.assets import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="module")
def real(default_model_dir):
    from transformers import AutoTokenizer

    from calibrate.data import eval_windows
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = eval_windows(tok, "wiki", 64, 1)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model(ids).logits.double()
    prepare(model)
    with torch.no_grad():
        prep = model(ids).logits.double()
    return model, ids, ((prep - ref).norm() / ref.norm()).item()


def test_prepare_is_exact_on_real_model(real):
    assert real[2] < 1e-4


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_is_exact_on_real_model(real, pair):
    import copy
    model, ids, _ = real
    _check(copy.deepcopy(model), ids, pair)


def _random(config_cls, **kw):
    cfg = config_cls(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                     head_dim=16, num_hidden_layers=2, vocab_size=300, tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so folding is exercised
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits.double()
    prepare(model)
    with torch.no_grad():
        assert ((model(ids).logits.double() - ref).norm() / ref.norm()).item() < 1e-4
    return model, ids


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_is_exact_on_qwen2_with_biases(pair):
    model, ids = _random(Qwen2Config)  # intermediate 160 = 5 * 32: a 20 * 8 Hadamard
    _check(model, ids, pair)


def test_all_pairs_exact_on_qwen3_with_qk_norm():
    model, ids = _random(Qwen3Config)
    _check(model, ids, "all", qk_scale=False)  # S_qk is off for q/k-normed models (SPEC §1)
