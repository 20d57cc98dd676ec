"""Shared fixtures of the plugin tests (the lead may add more).

Until calibrate/export.py lands, `export_tiny` writes a SPEC §7 folder of a tiny random Llama
(RTN weights, SmolLM2's tokenizer) and `tiny_reference` builds the fake-quant HF model that must
match it. Once the real exporter exists the agreement tests use it (see test_vllm_agreement.py).
"""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOL_DIR = os.path.expanduser("~/.cache/ostquant/models/SmolLM2-135M-Instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

PRESETS = {
    "w4a4kv4": dict(act_bits=4, kv_bits=4, weight_group_size=-1, online_hadamard={"down_proj": True, "qk": True}),
    "w4a8kv4": dict(act_bits=8, kv_bits=4, weight_group_size=-1, online_hadamard={"down_proj": True, "qk": True}),
    "w4a16": dict(act_bits=16, kv_bits=16, weight_group_size=32, online_hadamard={"down_proj": False, "qk": False}),
    "w4a4kv16": dict(act_bits=4, kv_bits=16, weight_group_size=-1, online_hadamard={"down_proj": True, "qk": False}),
}

TINY = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2, vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tokenizer_available() -> bool:
    return os.path.exists(os.path.join(SMOL_DIR, "tokenizer.json"))


def export_tiny(out_dir: str, preset: str = "w4a4kv4", seed: int = 0, **fmt_overrides) -> str:
    """A tiny random Llama as an ostquant checkpoint (RTN int4 weights). Returns out_dir."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ostquant_vllm.format import QuantFormat, quantized_linear_names
    from ostquant_vllm.numerics import pack_int4, quantize_weight, weight_scale

    fmt = QuantFormat(**{**PRESETS[preset], **fmt_overrides})
    fmt.validate()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY)
    model = LlamaForCausalLM(cfg)
    sd = {}
    qnames = set(quantized_linear_names(cfg))
    for name, t in model.state_dict().items():
        stem = name.rsplit(".", 1)[0]
        if stem in qnames:
            w = t.float() * 3.0  # a bit more spread than the 0.02 init
            s = weight_scale(w, 4, fmt.weight_group_size, mse=False).half()
            q = quantize_weight(w, s.float(), 4, fmt.weight_group_size)
            sd[f"{stem}.qweight"] = pack_int4(q).contiguous()
            sd[f"{stem}.weight_scale"] = s.contiguous()
        elif "norm" in name:
            sd[name] = (1 + 0.1 * torch.randn_like(t)).to(torch.bfloat16)
        elif "embed" in name or "lm_head" in name:
            sd[name] = (t * 2).to(torch.bfloat16).contiguous()
        else:
            sd[name] = t.to(torch.bfloat16).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = "bfloat16"
    d["quantization_config"] = fmt.to_dict()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=1)
    for fn in TOKENIZER_FILES:
        if os.path.exists(os.path.join(SMOL_DIR, fn)):
            shutil.copy(os.path.join(SMOL_DIR, fn), out_dir)
    return out_dir


def tiny_reference(ckpt_dir: str, dtype=torch.float32, tensor_parallel_size: int = 1):
    """The fake-quant HF model of an exported checkpoint (stand-in for calibrate.qmodel)."""
    try:
        from calibrate.qmodel import load_fake_quant_model

        # the KV cache of a vLLM run holds the model dtype: round the rotated K/V to it
        return load_fake_quant_model(ckpt_dir, dtype, kv_cache_dtype=dtype, tensor_parallel_size=tensor_parallel_size)
    except ImportError:
        if tensor_parallel_size != 1:
            raise
    from safetensors.torch import load_file
    from transformers import AttentionInterface, AutoConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ostquant_vllm.format import QuantFormat
    from ostquant_vllm.hadamard import apply_hadamard
    from ostquant_vllm.numerics import dequantize_weight, fake_quant_act, fake_quant_kv_int4, unpack_int4

    cfg = AutoConfig.from_pretrained(ckpt_dir)
    fmt = QuantFormat.from_dict(cfg.quantization_config)
    del cfg.quantization_config
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    new = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            stem = k[: -len(".qweight")]
            new[stem + ".weight"] = dequantize_weight(unpack_int4(v), sd[stem + ".weight_scale"],
                                                      fmt.weight_group_size).to(dtype)
        elif not k.endswith(".weight_scale"):
            new[k] = v.to(dtype)
    model.load_state_dict(new, strict=True)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            is_down = name.endswith("down_proj")

            def pre(m, args, is_down=is_down):
                x = args[0]
                if is_down and fmt.online_hadamard["down_proj"]:
                    x = apply_hadamard(x.float()).to(x.dtype)
                return (fake_quant_act(x, fmt.act_bits, fmt.act_sym, fmt.act_clip),)

            mod.register_forward_pre_hook(pre)
    if fmt.kv_bits == 4:
        def kv4_attention(module, query, key, value, *args, **kwargs):
            return sdpa_attention_forward(module, query, fake_quant_kv_int4(key, dtype),
                                          fake_quant_kv_int4(value, dtype), *args, **kwargs)

        AttentionInterface.register("ostquant_kv4_ref", kv4_attention)
        model.set_attn_implementation("ostquant_kv4_ref")
    else:
        model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{preset: folder} of tiny exported checkpoints, made once per session."""
    if not tokenizer_available():
        pytest.skip("SmolLM2 tokenizer not cached under ~/.cache/ostquant")
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {p: export_tiny(str(root / p), p) for p in PRESETS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REAL_TEXT_PROMPTS = [
    "The history of the Roman Empire spans",
    "Photosynthesis is the process by which plants",
    "In computer science, a hash table is",
    "The capital of France is Paris, a city known for",
    "Water boils at 100 degrees Celsius at sea level because",
    "The theory of general relativity, proposed by Albert Einstein,",
    "A healthy breakfast usually includes",
    "The first step in baking bread is to",
    "Machine learning models are trained by",
    "The Amazon rainforest is home to",
    "When writing a cover letter, you should",
    "The French Revolution began in 1789 when",
    "Volcanoes form when molten rock",
    "The best way to learn a new language is",
    "Shakespeare wrote many plays, including",
    "The human heart has four chambers:",
    "To solve a quadratic equation, one can",
    "The Great Wall of China was built to",
    "Electric cars differ from gasoline cars in that",
    "The moon orbits the Earth roughly every",
    "In economics, inflation refers to",
    "A good night's sleep is important because",
    "The Pacific Ocean is the largest ocean and",
    "Python is a popular programming language because",
    "The water cycle describes how water",
    "During the Industrial Revolution, factories",
    "Honeybees communicate with each other by",
    "The periodic table organizes chemical elements by",
    "Mount Everest, the highest mountain on Earth,",
    "A balanced diet contains proteins, carbohydrates and",
    "The internet was originally developed to",
    "Climate change affects polar bears because",
]


def export_real_rtn(out_dir: str, preset: str = "w4a4kv4") -> str:
    """The real default model (SmolLM2-135M-Instruct) as an ostquant checkpoint in seconds:
    SPEC §2 preparation, a random-Hadamard R_res (QuaRot-style, calibrate.transforms), H_down
    fused into down_proj when the preset has it online, RTN int4 weights (nothing learned),
    written by the lead's calibrate.export.export_checkpoint. (Without R_res, RTN W4A4 is a
    chaotic model where one 4-bit level flip from 1e-6 float noise changes the text.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrate.assets import default_model_dir
    from calibrate.export import export_checkpoint
    from calibrate.prepare import prepare
    from ostquant_vllm.format import QuantFormat, quantized_linear_names
    from ostquant_vllm.hadamard import hadamard_matrix
    from ostquant_vllm.numerics import quantize_weight, weight_scale

    src = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prepare(model, torch.float32)
    from calibrate.transforms import Geometry, random_hadamard_residual, rotate_residual

    g = Geometry.of(model.config)
    w = {k: v.detach().double() for k, v in model.named_parameters()}
    rotate_residual(w, random_hadamard_residual(g, torch.Generator().manual_seed(0)).double(), g)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(w[k].to(p.dtype))
    fmt = QuantFormat(**PRESETS[preset])
    if preset == "w4a16":
        fmt.weight_group_size = 64
    mods = dict(model.named_modules())
    qweights = {}
    with torch.no_grad():
        for name in quantized_linear_names(model.config):
            w = mods[name].weight.double()
            if name.endswith("down_proj") and fmt.online_hadamard["down_proj"]:
                w = w @ hadamard_matrix(w.shape[1])
                mods[name].weight.copy_(w.float())
            s = weight_scale(w.float(), 4, fmt.weight_group_size, mse=False).half()
            qweights[name] = (quantize_weight(w.float(), s.float(), 4, fmt.weight_group_size), s)
    tok = AutoTokenizer.from_pretrained(src)
    return export_checkpoint(model, qweights, fmt, out_dir, tokenizer=tok)


def real_model_available() -> bool:
    try:
        from calibrate.assets import default_model_dir  # noqa: F401
        from calibrate.export import export_checkpoint  # noqa: F401
        from calibrate.qmodel import load_fake_quant_model  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(os.path.join(SMOL_DIR, "model.safetensors"))


def agreement(llm, ref, prompts, n_tokens: int = 64, logprobs: int = 5, noise_floor: bool = True) -> dict:
    """Greedy agreement of a vLLM LLM with the fake-quant reference model.

    vLLM generates n_tokens greedily per prompt; the reference reads prompt + vLLM's tokens in one
    forward (teacher forcing) and its argmax at each position is its greedy choice given the same
    history. `token_agreement`: fraction of the positions where both choose the same token (all
    agree <=> the two greedy sequences are identical); `identical`: fraction of prompts whose
    whole sequence agrees; `first_logprob_max_diff`: max |logprob difference| over vLLM's top
    `logprobs` tokens at the first generated position.

    `noise_*`: the same two numbers for the reference against itself with its input embeddings
    perturbed by 1e-6 (relative) on the same token sequences: the float round-off floor. A 4-bit
    activation level flips when round-off moves a value across a rounding boundary, so two
    implementations that differ only in float summation order agree no better than this."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    agree = total = identical = n_agree = n_identical = 0
    max_diff = n_max_diff = 0.0
    g = torch.Generator().manual_seed(0)
    for o in outs:
        gen = list(o.outputs[0].token_ids)
        ids = torch.tensor([list(o.prompt_token_ids) + gen[:-1]])
        with torch.no_grad():
            logits = ref(ids).logits[0].float()
        p = len(o.prompt_token_ids)
        pred = logits[p - 1:].argmax(-1).tolist()
        match = [a == b for a, b in zip(pred, gen)]
        agree += sum(match)
        total += len(gen)
        identical += all(match)
        lp = logits[p - 1].log_softmax(-1)
        for tid, v in o.outputs[0].logprobs[0].items():
            max_diff = max(max_diff, abs(v.logprob - lp[tid].item()))
        if noise_floor:
            with torch.no_grad():
                e = ref.get_input_embeddings()(ids)
                e = e * (1 + 1e-6 * torch.randn(e.shape, generator=g, dtype=e.dtype))
                nl = ref(inputs_embeds=e).logits[0].float()
            nmatch = [a == b for a, b in zip(nl[p - 1:].argmax(-1).tolist(), pred)]
            n_agree += sum(nmatch)
            n_identical += all(nmatch)
            nlp = nl[p - 1].log_softmax(-1)
            for tid in o.outputs[0].logprobs[0]:
                n_max_diff = max(n_max_diff, abs(nlp[tid].item() - lp[tid].item()))
    res = {"token_agreement": agree / total, "identical": identical / len(outs), "prompts": len(outs),
           "tokens_per_prompt": n_tokens, "first_logprob_max_diff": max_diff}
    if noise_floor:
        res.update(noise_token_agreement=n_agree / total, noise_identical=n_identical / len(outs),
                   noise_first_logprob_max_diff=n_max_diff)
    return res
