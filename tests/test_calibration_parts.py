"""GPTQ vs RTN, training (resume, orthogonality, KL-Top), export + validating loader, QSUR, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from calibrate.fuse import fuse, transformable_weights
from calibrate.gptq import gptq, rtn, weight_error
from calibrate.prepare import prepare
from calibrate.qmodel import QuantSettings, load_fake_quant_model, quantize_model
from calibrate.qsur import log10_qsur_per_dim
from calibrate.train import TrainConfig, accumulate_gradients, kl_top, orthogonality_error, teacher_topk, train
from calibrate.transforms import Geometry, Transforms, womi_ov, womi_residual
from ostquant_vllm.format import CheckpointError, QuantFormat, validate_checkpoint

torch.set_num_threads(1)


def tiny_llama(seed=0, layers=2):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_hidden_layers=layers, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------
def test_gptq_beats_rtn_on_real_activations():
    """Real inputs of the default model's layer-3 linears (outliers and all), fitted on half of
    the tokens and measured on the other half: GPTQ's output error is below RTN's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrate.assets import default_model_dir
    from calibrate.data import calib_windows
    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.layers = model.model.layers[:4]  # only the inputs of layer 3 are needed
    ids = calib_windows(AutoTokenizer.from_pretrained(path), "c4", 512, 8, seed=0)
    for lin in (model.model.layers[3].mlp.gate_proj, model.model.layers[3].self_attn.o_proj):
        xs = []
        h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(ids)
        h.remove()
        X = torch.cat(xs).double()
        fit, held = X[: len(X) // 2], X[len(X) // 2:]
        w = lin.weight.detach()
        q_g, s_g = gptq(w, fit.T @ fit, 4)
        q_r, s_r = rtn(w, 4)
        e_g, e_r = weight_error(w, q_g, s_g, held.float()), weight_error(w, q_r, s_r, held.float())
        assert e_g < e_r, (e_g, e_r)
        assert q_g.min() >= -8 and q_g.max() <= 7


def test_gptq_group_scales_shape():
    w = torch.randn(32, 256)
    X = torch.randn(512, 256)
    q, s = gptq(w, X.T @ X, 4, group_size=64)
    assert s.shape == (32, 4) and s.dtype == torch.float16 and q.shape == w.shape


# ---------------------------------------------------------------------------------------------
def test_kl_top_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(2, 5, 300)
    p, ids = torch.softmax(logits, -1).topk(50, -1)
    assert kl_top(logits, ids.int(), p).abs() < 1e-6
    assert kl_top(logits + torch.randn_like(logits), ids.int(), p) > 0.01


def _train_setup(seed=0):
    model = tiny_llama()
    prepare(model)
    settings = QuantSettings(a_bits=4, kv_bits=4)
    quantize_model(model, settings, had_down=True)
    g = Geometry.of(model.config)
    w = transformable_weights(model)
    gen = torch.Generator().manual_seed(seed)
    T = Transforms(g, r_res=womi_residual(w, g, gen), r_ov=womi_ov(w, g, gen), learn_rotations=True,
                   scales=True, scale_qk=True, had_down=True)
    windows = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3))
    return model, w, T, windows, settings


def test_micro_batched_gradients_equal_one_full_batch_backward():
    """accumulate_gradients (transform once, micro-batches into detached weights, one backward through
    the transforms) gives the gradients of the plain full-batch loss."""
    model, w, T, windows, settings = _train_setup()
    model.requires_grad_(False)
    ids, probs = teacher_topk(model, T.apply(w), windows, settings, 50, 2)
    idx = torch.arange(4)
    loss = accumulate_gradients(model, w, T, windows, ids, probs, idx, micro_batch=1)
    got = {n: p.grad.clone() for n, p in T.named_parameters() if p.grad is not None}
    T.zero_grad(set_to_none=True)
    logits = functional_call(model, T.apply(w), (windows[idx],), {"use_cache": False}).logits
    ref = kl_top(logits, ids[idx], probs[idx])
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert set(got) == {n for n, p in T.named_parameters() if p.grad is not None} and len(got) >= 5
    for n, p in T.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad, rtol=1e-3, atol=1e-8 + 1e-4 * p.grad.abs().max().item()), n


def test_training_lowers_loss_keeps_orthogonality_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=6, batch=4, micro_batch=2, top_k=50, save_every=2, seed=0)
    model, w, T_full, windows, settings = _train_setup()
    losses_full = train(model, w, T_full, windows, settings, cfg)
    assert orthogonality_error(T_full) < 1e-4
    assert T_full.r_res.dtype == torch.float32

    model2, w2, T_part, windows2, settings2 = _train_setup()
    state = str(tmp_path / "state.pt")
    train(model2, w2, T_part, windows2, settings2, cfg, state_path=state, stop_after=3)  # killed after step 3
    assert torch.load(state, weights_only=False)["step"] == 2                            # last save: step 2
    model3, w3, T_res, windows3, settings3 = _train_setup()
    losses_res = train(model3, w3, T_res, windows3, settings3, cfg, state_path=state, resume=True)
    # Same to float32 round-off (KL values here are ~3e-4); a lost optimizer or scheduler state
    # changes them by orders of magnitude more.
    assert losses_res == pytest.approx(losses_full, rel=2e-4)
    for (n, a), b in zip(T_full.state_dict().items(), T_res.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n


def test_trained_transforms_fuse_exactly():
    cfg = TrainConfig(steps=2, batch=2, micro_batch=2, top_k=50, seed=0)
    model, w, T, windows, settings = _train_setup()
    train(model, w, T, windows, settings, cfg)
    ref_model = tiny_llama()
    with torch.no_grad():
        ref = ref_model(windows).logits.double()
    fuse(model, T)
    settings.enabled = False
    with torch.no_grad():
        out = model(windows).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


# ---------------------------------------------------------------------------------------------
def test_qsur_prefers_rotated_outliers():
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    x[:, 0] *= 50  # one outlier channel: an elongated ellipsoid in a big cube
    from ostquant_vllm.hadamard import apply_hadamard
    before, after = log10_qsur_per_dim(x), log10_qsur_per_dim(apply_hadamard(x))
    assert after > before
    assert log10_qsur_per_dim(torch.randn(10, 64)) is None  # fewer samples than dimensions


# ---------------------------------------------------------------------------------------------
def _export_tiny(tmp_path, preset=dict(act_bits=4, kv_bits=4)):
    from calibrate.export import export_checkpoint
    from calibrate.gptq import quantize_weights
    model = tiny_llama()
    prepare(model)
    fmt = QuantFormat(**preset)
    settings = QuantSettings.from_format(fmt)
    quantize_model(model, settings, had_down=True)
    q = quantize_weights(model, settings, None, method="rtn")
    out = str(tmp_path / "ckpt")
    export_checkpoint(model, q, fmt, out)
    return model, q, out


def test_export_roundtrip_equals_in_memory_model(tmp_path):
    from calibrate.qmodel import set_quantized_weights
    model, q, out = _export_tiny(tmp_path)
    reloaded = load_fake_quant_model(out, kv_cache_dtype=None)
    set_quantized_weights(model, q, -1, keep_dtype=torch.bfloat16)  # what the pipeline evaluates
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "ostquant" and cfg["tie_word_embeddings"] is False


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    st = load_file(path)
    fn(st)
    save_file(st, path)


@pytest.mark.parametrize("case,match", [
    ("missing", "model.layers.1.mlp.down_proj.qweight is missing"),
    ("shape", "model.layers.0.self_attn.k_proj.weight_scale has shape"),
    ("dtype", "model.layers.0.self_attn.q_proj.qweight has shape .* dtype F32"),
    ("extra", "unexpected tensor model.layers.0.mlp.up_proj.weight_scale_2.qweight|unexpected tensor"),
    ("version", "format_version=2"),
    ("bits", "act_bits=5"),
    ("truncated", "truncated|unreadable"),
])
def test_bad_checkpoints_name_the_culprit(tmp_path, case, match):
    _, _, out = _export_tiny(tmp_path)
    st_path = os.path.join(out, "model.safetensors")
    cfg_path = os.path.join(out, "config.json")
    if case == "missing":
        _rewrite(st_path, lambda st: st.pop("model.layers.1.mlp.down_proj.qweight"))
    elif case == "shape":
        _rewrite(st_path, lambda st: st.update({"model.layers.0.self_attn.k_proj.weight_scale": torch.ones(3, dtype=torch.float16)}))
    elif case == "dtype":
        _rewrite(st_path, lambda st: st.update({"model.layers.0.self_attn.q_proj.qweight":
                                                st["model.layers.0.self_attn.q_proj.qweight"].float()}))
    elif case == "extra":
        _rewrite(st_path, lambda st: st.update({"model.layers.0.mlp.up_proj.weight_scale_2.qweight": torch.ones(2, dtype=torch.int8)}))
    elif case in ("version", "bits"):
        cfg = json.load(open(cfg_path))
        cfg["quantization_config"].update({"format_version": 2} if case == "version" else {"act_bits": 5})
        json.dump(cfg, open(cfg_path, "w"))
    elif case == "truncated":
        size = os.path.getsize(st_path)
        with open(st_path, "r+b") as f:
            f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(out)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [[], ["calibrate"], ["eval"], ["generate"]])
def test_cli_help(cmd):
    r = subprocess.run([sys.executable, "-m", "calibrate.cli", *cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0,
               architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    r = subprocess.run([sys.executable, "-m", "calibrate.cli", "calibrate", str(tmp_path), "--no-qsur"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "architecture GPT2LMHeadModel is not supported" in r.stderr and "LlamaForCausalLM" in r.stderr


def test_calibration_on_the_evaluation_text_never_overlaps_it(monkeypatch):
    """--calib-text wiki draws only from the tokens after the evaluation windows, and says so when
    too few are left."""
    from calibrate import data

    monkeypatch.setattr(data, "token_stream", lambda tok, text: torch.arange(1000))
    evals = data.eval_windows(None, "wiki", seqlen=100, max_windows=6)
    w = data.calib_windows(None, "wiki", seqlen=50, n=64, seed=0, skip_tokens=evals.numel())
    assert w.min() >= evals.numel() and w.max() < 1000 and w.shape == (64, 50)
    assert (w[:, 1:] - w[:, :-1] == 1).all()  # contiguous windows of the text
    with pytest.raises(ValueError, match="after the 960 held out for evaluation"):
        data.calib_windows(None, "wiki", seqlen=50, n=4, skip_tokens=960)


def test_concurrent_model_conversions_keep_the_first_complete_folder(tmp_path):
    """Two calibrations on a fresh cache convert the same GGUF side by side: the second to finish
    keeps the first one's folder instead of failing, and an incomplete folder is never taken."""
    from calibrate.assets import publish_folder

    out = tmp_path / "models" / "m"
    for i in (1, 2):
        (tmp_path / f"tmp{i}").mkdir()
        (tmp_path / f"tmp{i}" / "model.safetensors").write_text(f"run {i}")
    assert publish_folder(str(tmp_path / "tmp1"), str(out)) == str(out)
    publish_folder(str(tmp_path / "tmp2"), str(out))
    assert (out / "model.safetensors").read_text() == "run 1" and not (tmp_path / "tmp2").exists()
    bad = tmp_path / "models" / "bad"
    (bad / "partial").mkdir(parents=True)
    (tmp_path / "tmp3").mkdir()
    (tmp_path / "tmp3" / "model.safetensors").write_text("run 3")
    with pytest.raises(OSError):
        publish_folder(str(tmp_path / "tmp3"), str(bad))
