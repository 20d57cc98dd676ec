"""The accuracy ordering on the real default model at W4A4KV4, with a budget that fits CI (RTN weights for
all three methods, to stay fast): float < QuaRot-style < RTN / 10 perplexity, and OSTQuant's training and
fusion keep QuaRot's accuracy.

4-bit activations with SmolLM2's down_proj outliers (|x| up to ~500) break RTN without transforms; QuaRot's
rotations fix most of it. OSTQuant here starts from QuaRot's random Hadamards (`init="hadamard"`, the full-size
H_down as the accuracy table) and trains 8 steps of 2 windows (from 4). Held-out perplexity on 16 windows.

What this budget can show, measured on the dev machine (AMD EPYC, 1 thread): 8 steps move the held-out
perplexity less than QuaRot's own seed-to-seed spread. QuaRot gave 123.4 / 109.4 / 105.5 at seeds 0 / 1 / 2;
OSTQuant from those starts 118.5 at seed 0 (official learning rates) and 110.7-110.8 at seed 2 (1.05x, with
the rotations' learning rate at 0.05 or a full batch of 4 windows); with 2 evaluation windows seed 0 gave
82.13 against 82.20 (the earlier bar, 0.95x QuaRot, passed on one CI machine and failed on the next).
Nor does the KL-Top objective fall measurably: at seed 0 its mean over the first epoch (2 steps, all 4
windows) was 0.564, over the last 0.571 (that training lowers the loss is tested on a small model in
test_calibration_parts.py).
So CI asserts only that the learned transforms stay near their QuaRot start (a broken fusion, export of
the scales or diverging training lands far above); that OSTQuant beats QuaRot is measured where the recipe
runs in full (the accuracy table: 29.7 / 29.8 / 28.8 against 37.1 / 35.8 / 36.6 over 3 seeds,
benchmarks/results/accuracy_SmolLM2-135M-Instruct.json)."""
import torch

from calibrate.pipeline import CalibConfig, calibrate
from calibrate.train import TrainConfig


def _ppl(method):
    cfg = CalibConfig(method=method, preset="w4a4kv4", weight_quant="rtn", calib_windows=2, calib_seqlen=256,
                      train=TrainConfig(steps=8, batch=2, micro_batch=1), train_windows=4, train_seqlen=256,
                      init="hadamard", hadamard_blocks=1, eval_windows=16, eval_seqlen=256, eval_float=method == "rtn",
                      qsur=False, device="cpu")
    return calibrate(cfg)


def test_quarot_beats_rtn_and_ostquant_keeps_it_at_w4a4kv4_on_real_model():
    torch.set_num_threads(1)
    rtn = _ppl("rtn")
    quarot = _ppl("quarot")
    ost = _ppl("ostquant")
    losses = ost["train"]["losses"]
    assert len(losses) == 8 and all(0 < x < 10 for x in losses), losses
    assert ost["train"]["orthogonality_error"] < 1e-3
    assert rtn["ppl_float"] < quarot["ppl"] < rtn["ppl"] / 10, (rtn["ppl_float"], quarot["ppl"], rtn["ppl"])
    assert rtn["ppl_float"] < ost["ppl"] < 1.1 * quarot["ppl"], (rtn["ppl_float"], ost["ppl"], quarot["ppl"])
