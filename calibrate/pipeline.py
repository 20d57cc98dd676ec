"""The calibration recipe, top to bottom:
load -> prepare -> transforms -> train -> fuse -> quantize -> evaluate -> export.

Three methods share it: "rtn" (no transforms, RTN weights), "quarot" (random Hadamard R_res and
R_ov, online Hadamards, GPTQ) and "ostquant" (WOMI init, learned rotations and scales, GPTQ).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from ostquant_vllm.format import QuantFormat
from ostquant_vllm.hadamard import default_blocks

from . import __version__
from .data import calib_windows, eval_windows
from .evaluate import perplexity
from .export import STORE_DTYPE, export_checkpoint
from .fuse import fuse, transformable_weights
from .gptq import quantize_weights
from .models import has_qk_norm, load_model
from .prepare import prepare
from .qmodel import QuantSettings, quant_disabled, quantize_model, set_quantized_weights
from .qsur import model_qsur
from .train import TrainConfig, orthogonality_error, train
from .transforms import Geometry, Transforms, random_hadamard_ov, random_hadamard_residual, womi_ov, womi_residual

log = logging.getLogger(__name__)

PRESETS = {
    "w4a16": dict(act_bits=16, kv_bits=16),
    "w4a4kv16": dict(act_bits=4, kv_bits=16),
    "w4a4kv4": dict(act_bits=4, kv_bits=4),
    "w4a8kv4": dict(act_bits=8, kv_bits=4),
    "w4a16kv4": dict(act_bits=16, kv_bits=4),
}
METHODS = ("rtn", "quarot", "ostquant")


@dataclass
class CalibConfig:
    model: str = "SmolLM2-135M-Instruct"
    method: str = "ostquant"
    preset: str = "w4a4kv4"
    weight_bits: int = 4
    weight_group_size: int = -1
    weight_quant: str = "gptq"          # or "rtn"
    act_sym: bool = False
    act_clip: float = 1.0
    hadamard_blocks: int = 0            # H_down = I_b (x) H_{m/b}: vLLM serves it at any TP degree dividing b;
    #                                     0: hadamard.default_blocks(m), 8 where it exists (TP 1, 2, 4, 8)
    calib_text: str = "c4"
    calib_windows: int = 16             # GPTQ Hessians
    calib_seqlen: int = 512
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=8, batch=4, micro_batch=2))
    train_windows: int = 16
    train_weight_quant: bool | None = None   # weight fake quantization while training; None: only for W4A16 (official)
    init: str = "womi"                  # OSTQuant's starting rotations: "womi" (SPEC §5) or "hadamard" (QuaRot's)
    train_seqlen: int = 256
    eval_text: str = "wiki"
    eval_windows: int = 8
    eval_seqlen: int = 512
    eval_float: bool = True
    qsur: bool = True
    qsur_tokens: int = 2048
    zeroshot_tasks: tuple = ()
    zeroshot_limit: int | None = None
    seed: int = 0
    device: str = ""                    # "" : cuda when available, else cpu
    threads: int = 1                    # torch threads: on 2 shared cores, 1 beats 2 (OpenMP spin under load)

    def quant_format(self, intermediate_size: int | None = None) -> QuantFormat:
        """The checkpoint's format; `intermediate_size` resolves hadamard_blocks=0 (before the model is
        loaded, only the other fields are checked)."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose from {', '.join(PRESETS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        p = PRESETS[self.preset]
        transforms = self.method != "rtn"
        fmt = QuantFormat(weight_bits=self.weight_bits, weight_group_size=self.weight_group_size,
                          act_bits=p["act_bits"], act_sym=self.act_sym, act_clip=self.act_clip,
                          kv_bits=p["kv_bits"],
                          online_hadamard={"down_proj": transforms, "qk": p["kv_bits"] < 16},
                          hadamard_blocks=self.hadamard_blocks or default_blocks(intermediate_size or 1))
        fmt.validate()
        return fmt


def init_transforms(method: str, act_bits: int, weights: dict, g: Geometry, qk_scale: bool, seed: int, device=None,
                    init: str = "womi", had_down: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if method == "rtn":
        return None
    if method == "quarot":
        return Transforms(g, r_res=random_hadamard_residual(g, gen), r_ov=random_hadamard_ov(g, gen),
                          learn_rotations=False, scales=False, scale_qk=False, had_down=had_down, device=device)
    if init not in ("womi", "hadamard"):
        raise ValueError(f"unknown init {init!r}: choose womi or hadamard")
    if init == "hadamard":  # QuaRot's random Hadamards, then learned
        r_res, r_ov = random_hadamard_residual(g, gen), random_hadamard_ov(g, gen)
    else:  # WOMI (the official W4A16 recipe starts R_res from a random Hadamard instead)
        r_res = random_hadamard_residual(g, gen) if act_bits >= 16 else womi_residual(weights, g, gen)
        r_ov = womi_ov(weights, g, gen)
    return Transforms(g, r_res=r_res, r_ov=r_ov, learn_rotations=True, scales=True, scale_qk=qk_scale,
                      had_down=had_down, device=device)


def calibrate(cfg: CalibConfig, out_dir: str | None = None, work_dir: str | None = None, resume: bool = False) -> dict:
    """Run the recipe; export to out_dir when given. Returns the report."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.quant_format()  # a bad preset or method stops here, before the model is loaded
    torch.manual_seed(cfg.seed)
    report = {"package_version": __version__, "config": _jsonable(dataclasses.asdict(cfg))}

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls; quantizer arithmetic stays fp32
    model, tokenizer, path = load_model(cfg.model)
    model.to(device)
    report["model_path"], report["device"] = path, str(device)
    fmt = cfg.quant_format(model.config.intermediate_size)
    report["quantization_config"] = fmt.to_dict()
    if fmt.online_hadamard["down_proj"]:
        log.info("down_proj's online Hadamard: I_%d (x) H_%d (vLLM tensor parallel sizes dividing %d)",
                 fmt.hadamard_blocks, model.config.intermediate_size // fmt.hadamard_blocks, fmt.hadamard_blocks)
    evals = eval_windows(tokenizer, cfg.eval_text, cfg.eval_seqlen, cfg.eval_windows).to(device)
    # calibrating on the evaluation text: only on what follows the evaluation windows (never overlapping)
    held_out = evals.numel() if cfg.calib_text == cfg.eval_text else 0
    gptq_windows = calib_windows(tokenizer, cfg.calib_text, cfg.calib_seqlen, cfg.calib_windows, cfg.seed,
                                 held_out).to(device)
    report["data"] = {"eval": f"{cfg.eval_text}: first {len(evals)} windows of {cfg.eval_seqlen} tokens",
                      "calibration": f"{cfg.calib_text} (after token {held_out}): {cfg.calib_windows} windows of "
                                     f"{cfg.calib_seqlen} "
                                     f"(GPTQ), {cfg.train_windows} of {cfg.train_seqlen} (training), seed {cfg.seed}"}

    log.info("preparing: untie lm_head, fold RMSNorm weights, float32")
    prepare(model)
    settings = QuantSettings.from_format(fmt, kv_cache_dtype=STORE_DTYPE)
    quantize_model(model, settings, had_down=False)
    if cfg.eval_float:
        with quant_disabled(settings):
            report["ppl_float"] = perplexity(model, evals, desc="perplexity (float)")
            log.info("float perplexity %.3f", report["ppl_float"])
            if cfg.zeroshot_tasks:
                report["zeroshot_float"] = _zeroshot(cfg, model, tokenizer, device)
    if cfg.qsur:
        report["qsur_before"] = model_qsur(model, evals, settings, cfg.qsur_tokens)

    g = Geometry.of(model.config)
    weights = transformable_weights(model)
    transforms = init_transforms(cfg.method, fmt.act_bits, weights, g, not has_qk_norm(model.config), cfg.seed,
                                 device, cfg.init, had_down=fmt.hadamard_blocks)
    if transforms is not None and transforms.had_down:  # the online x -> x H before down_proj
        for layer in model.model.layers:
            layer.mlp.down_proj.hadamard = transforms.had_down
    if cfg.method == "ostquant":
        train_windows = calib_windows(tokenizer, cfg.calib_text, cfg.train_seqlen, cfg.train_windows,
                                      cfg.seed + 1, held_out).to(device)
        settings.w_fake = fmt.act_bits >= 16 if cfg.train_weight_quant is None else cfg.train_weight_quant
        state_path = os.path.join(work_dir, "train_state.pt") if work_dir else None
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
        t_train = time.time()
        losses = train(model, weights, transforms, train_windows, settings, cfg.train, state_path, resume)
        settings.w_fake = False
        report["train"] = {"losses": losses, "seconds": time.time() - t_train,
                           "orthogonality_error": orthogonality_error(transforms)}
        transforms.project_rotations()
        log.info("trained %d steps: KL-top %.4f -> %.4f, ||R^T R - I|| = %.2e", len(losses), losses[0], losses[-1],
                 report["train"]["orthogonality_error"])
    if transforms is not None:
        log.info("fusing the transforms into the weights (float64)")
        fuse(model, transforms)
    if cfg.qsur:
        report["qsur_after"] = model_qsur(model, evals, settings, cfg.qsur_tokens)

    method = "rtn" if cfg.method == "rtn" else cfg.weight_quant
    log.info("quantizing weights: %s, %d bits, group %d", method, fmt.weight_bits, fmt.weight_group_size)
    qweights = quantize_weights(model, settings, gptq_windows, method=method)
    set_quantized_weights(model, qweights, fmt.weight_group_size, keep_dtype=STORE_DTYPE)

    report["ppl"] = perplexity(model, evals, desc=f"perplexity ({cfg.method} {cfg.preset})")
    log.info("%s %s perplexity %.3f", cfg.method, cfg.preset, report["ppl"])
    if cfg.zeroshot_tasks:
        report["zeroshot"] = _zeroshot(cfg, model, tokenizer, device)
    report["seconds"] = time.time() - t0
    if out_dir:
        export_checkpoint(model, qweights, fmt, out_dir, tokenizer, report)
    return report


def _zeroshot(cfg: CalibConfig, model, tokenizer, device) -> dict:
    from .zeroshot import evaluate_zeroshot
    return evaluate_zeroshot(model, tokenizer, list(cfg.zeroshot_tasks), limit=cfg.zeroshot_limit,
                             batch_size=32 if device.type == "cuda" else 8)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)
