"""The accuracy ordering on the real default model at W4A4KV4, with a budget that fits CI:
OSTQuant < QuaRot-style < RTN perplexity (RTN weights for all three, to stay fast).

4-bit activations with SmolLM2's down_proj outliers (|x| up to ~500) break RTN without transforms;
QuaRot's rotations fix most of it; OSTQuant's learned rotations and scales must then beat QuaRot on
held-out text after 8 training steps of 2 windows (from 4). On a budget this small OSTQuant starts from QuaRot's random
Hadamards (`init="hadamard"`): from WOMI it needs far more steps to pass them (measured here: 137 vs
QuaRot's 89; on the H100 with the full recipe both starts end at 33.8 against QuaRot's 37.1,
benchmarks/results/accuracy_SmolLM2-135M-Instruct.json). The full-size H_down (hadamard_blocks=1), as
that table: with calibration's TP-splittable default of 8 blocks, 4 steps of 2 windows are too few for
the training loss to fall reliably (measured: 0.659 -> 0.665); the full recipe still separates them
(the table's experiment lines). Budgets this small are chaotic: on an Intel CI machine, 4 steps on 2 windows
(the earlier budget, which passed on AMD) gave OSTQuant 128.7 against QuaRot's 85.6; 8 steps on 4 windows
gave 78.4 there."""
import torch

from calibrate.pipeline import CalibConfig, calibrate
from calibrate.train import TrainConfig


def _ppl(method):
    cfg = CalibConfig(method=method, preset="w4a4kv4", weight_quant="rtn", calib_windows=2, calib_seqlen=256,
                      train=TrainConfig(steps=8, batch=2, micro_batch=1), train_windows=4, train_seqlen=256,
                      init="hadamard", hadamard_blocks=1, eval_windows=2, eval_seqlen=256, eval_float=method == "rtn", qsur=False,
                      device="cpu")
    return calibrate(cfg)


def test_ostquant_beats_quarot_beats_rtn_at_w4a4kv4_on_real_model():
    torch.set_num_threads(1)
    rtn = _ppl("rtn")
    quarot = _ppl("quarot")
    ost = _ppl("ostquant")
    assert ost["train"]["losses"][-1] < ost["train"]["losses"][0]
    assert rtn["ppl_float"] < ost["ppl"] < 0.95 * quarot["ppl"] < quarot["ppl"] < rtn["ppl"] / 10, (
        rtn["ppl_float"], ost["ppl"], quarot["ppl"], rtn["ppl"])
