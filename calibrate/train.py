"""SPEC §5: learning the transforms. KL-Top against the float model, geoopt RiemannianAdam
(rotations on the Stiefel manifold, log-scales in Euclidean space), linear decay, fake
quantization with straight-through rounding. Resumable: the whole state is saved every N steps
and a resumed run continues to the same result as an uninterrupted one."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import geoopt
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from .qmodel import QuantSettings, quant_disabled
from .transforms import Transforms

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 100
    batch: int = 32              # windows per step
    micro_batch: int = 2         # windows per forward (gradient accumulation)
    top_k: int = 1000
    lr_rot: float = 0.0169
    lr_scale: float = 0.00179
    stabilize: int = 10
    save_every: int = 10
    seed: int = 0


@torch.no_grad()
def teacher_topk(model, weights: dict, windows: torch.Tensor, settings: QuantSettings, k: int, micro_batch: int):
    """Top-k token ids and their probabilities (softmax over the full vocabulary) of the float model:
    the same network with quantization off, fed the transformed weights (equal to the original)."""
    ids, probs = [], []
    with quant_disabled(settings):
        for i in tqdm(range(0, len(windows), micro_batch), desc="teacher top-k", leave=False):
            logits = functional_call(model, weights, (windows[i:i + micro_batch],), {"use_cache": False}).logits.float()
            p, top = torch.softmax(logits, -1).topk(k, dim=-1)
            ids.append(top.to(torch.int32))
            probs.append(p)
    return torch.cat(ids), torch.cat(probs)


def kl_top(student_logits: torch.Tensor, top_ids: torch.Tensor, top_probs: torch.Tensor) -> torch.Tensor:
    """KL-Top: KL(teacher || student) restricted to the teacher's top-k ids, per token, with both
    distributions normalised over the full vocabulary (not renormalised over the k)."""
    logp = torch.log_softmax(student_logits.float(), -1).gather(-1, top_ids.long())
    return F.kl_div(logp.reshape(-1, logp.shape[-1]), top_probs.reshape(-1, top_probs.shape[-1]),
                    reduction="batchmean")


def step_windows(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the windows of a step: epochs of seeded permutations, a function of the step alone."""
    per_epoch = max(n // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * batch:(pos + 1) * batch] if n >= batch else perm


def accumulate_gradients(model, base_weights: dict, transforms: Transforms, windows, top_ids, top_probs,
                         idx: torch.Tensor, micro_batch: int) -> float:
    """Gradients of the step's mean KL-Top into the transforms' .grad; returns the loss.

    The transforms are applied once; the micro-batches backpropagate into detached copies of the
    transformed weights (each one's activations are freed at once), then one backward takes the
    summed weight gradients through the transforms: memory is one micro-batch's at any batch size."""
    weights = transforms.apply(base_weights)
    leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in weights.items()}
    total = 0.0
    for j in range(0, len(idx), micro_batch):
        mb = idx[j:j + micro_batch]
        logits = functional_call(model, leaves, (windows[mb],), {"use_cache": False}).logits
        loss = kl_top(logits, top_ids[mb], top_probs[mb]) * len(mb) / len(idx)
        loss.backward()
        total += loss.item()
    grads = [(w, leaves[k].grad) for k, w in weights.items() if leaves[k].grad is not None]
    torch.autograd.backward([w for w, _ in grads], [g for _, g in grads])
    return total


def _make_optimizer(transforms: Transforms, cfg: TrainConfig):
    groups = [{"params": transforms.rotation_parameters(), "lr": cfg.lr_rot},
              {"params": transforms.scale_parameters(), "lr": cfg.lr_scale}]
    groups = [g for g in groups if g["params"]]
    opt = geoopt.optim.RiemannianAdam(groups, stabilize=cfg.stabilize, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps))
    return opt, sched


def _save(path: str, transforms, opt, sched, step: int, losses: list) -> None:
    tmp = path + ".tmp"
    torch.save({"transforms": transforms.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "losses": losses}, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def train(model, base_weights: dict, transforms: Transforms, windows: torch.Tensor, settings: QuantSettings,
          cfg: TrainConfig, state_path: str | None = None, resume: bool = False, stop_after: int | None = None):
    """Optimise `transforms` in place. Returns the per-step losses.

    `stop_after` ends the run early (as if killed) after that many steps in this call: for tests.
    """
    with torch.no_grad():
        top_ids, top_probs = teacher_topk(model, transforms.apply(base_weights), windows, settings, cfg.top_k,
                                          cfg.micro_batch)
    opt, sched = _make_optimizer(transforms, cfg)
    start, losses = 0, []
    if resume and state_path and os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        transforms.load_state_dict(state["transforms"])
        opt.load_state_dict(state["optimizer"])
        for st in opt.state.values():  # torch's loader turns geoopt's int step counts into float32 tensors,
            if torch.is_tensor(st.get("step")):  # whose bias corrections round differently from an unbroken run's
                st["step"] = int(st["step"].item())
        sched.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
        log.info("resuming training at step %d of %d from %s", start, cfg.steps, state_path)
    model.requires_grad_(False)
    done = 0
    bar = tqdm(range(start, cfg.steps), desc="train transforms", initial=start, total=cfg.steps)
    for step in bar:
        idx = step_windows(step, len(windows), cfg.batch, cfg.seed)
        opt.zero_grad(set_to_none=True)
        total = accumulate_gradients(model, base_weights, transforms, windows, top_ids, top_probs, idx,
                                     cfg.micro_batch)
        with _full_fp32():  # the Stiefel retraction needs fp32 matmuls: under TF32 rotations drift (1e-2)
            opt.step()
        sched.step()
        losses.append(total)
        bar.set_postfix(kl_top=f"{total:.4f}")
        done += 1
        if state_path and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save(state_path, transforms, opt, sched, step + 1, losses)
        if stop_after is not None and done >= stop_after:
            break
    return losses


@contextlib.contextmanager
def _full_fp32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def orthogonality_error(transforms: Transforms) -> float:
    """max ||R^T R - I|| (Frobenius) over every rotation."""
    err = 0.0
    for R in (transforms.r_res, transforms.r_ov):
        if R is not None:
            R = R.detach().double()
            eye = torch.eye(R.shape[-1], dtype=torch.float64, device=R.device)
            err = max(err, torch.linalg.matrix_norm(R.transpose(-1, -2) @ R - eye).max().item())
    return err
