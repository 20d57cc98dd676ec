"""SPEC §3: the equivalence pairs, each a small function on a dict of weights, and the module that
holds their learnable parameters.

Every pair multiplies a weight by a matrix and the weight on the other side of the activation
by its inverse. `Transforms.apply(weights)` composes them; training calls it with gradients
(functional_call on the model), fusing calls it once in float64 and writes the result back.
Weights are nn.Linear's [out, in]: y = x W^T.
"""
from __future__ import annotations

from dataclasses import dataclass

import geoopt
import torch
from torch import nn

from ostquant_vllm.hadamard import block_size, hadamard_matrix, random_hadamard_matrix

READERS_ATTN = ("q_proj", "k_proj", "v_proj")
READERS_FFN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Geometry:
    layers: int
    d: int        # hidden size
    heads: int    # query heads
    kv_heads: int
    h: int        # head dim
    m: int        # intermediate size

    @classmethod
    def of(cls, config) -> "Geometry":
        h = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, h, config.intermediate_size)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def attn(i: int, proj: str, p: str = "weight") -> str:
    return f"model.layers.{i}.self_attn.{proj}.{p}"


def mlp(i: int, proj: str) -> str:
    return f"model.layers.{i}.mlp.{proj}.weight"


# ------------------------------------------------------------------------------------------
# The pairs
# ------------------------------------------------------------------------------------------
def rotate_residual(w: dict, R: torch.Tensor, g: Geometry) -> None:
    """R_res: the residual stream x -> x R. Readers W <- W R, writers W <- R^T W, embedding E <- E R."""
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] @ R
    w["lm_head.weight"] = w["lm_head.weight"] @ R
    for i in range(g.layers):
        for key in [attn(i, p) for p in READERS_ATTN] + [mlp(i, p) for p in READERS_FFN]:
            w[key] = w[key] @ R
        for key in (attn(i, "o_proj"), mlp(i, "down_proj")):
            w[key] = R.T @ w[key]


def scale_norm_output(w: dict, norm_key: str, reader_keys: list[str], s: torch.Tensor) -> None:
    """S_attn / S_ffn: the norm's output x -> x / s (gamma <- gamma / s), its readers W <- W diag(s)."""
    w[norm_key] = w[norm_key] / s
    for key in reader_keys:
        w[key] = w[key] * s


def transform_ov(w: dict, i: int, R: torch.Tensor, s: torch.Tensor, g: Geometry) -> None:
    """R_ov S_ov per KV head (T = R diag(s)): v_g -> v_g T, so W_v,g <- T^T W_v,g and
    W_o <- W_o T^-T = W_o R diag(1/s) on the columns of every query head of the group."""
    T = R * s[:, None, :]                                          # [kv, h, h]
    wv = w[attn(i, "v_proj")].reshape(g.kv_heads, g.h, g.d)
    w[attn(i, "v_proj")] = (T.transpose(-1, -2) @ wv).reshape(g.kv_heads * g.h, g.d)
    if attn(i, "v_proj", "bias") in w:
        b = w[attn(i, "v_proj", "bias")].reshape(g.kv_heads, 1, g.h)
        w[attn(i, "v_proj", "bias")] = (b @ T).reshape(-1)
    wo = w[attn(i, "o_proj")].reshape(g.d, g.kv_heads, g.group, g.h)
    w[attn(i, "o_proj")] = torch.einsum("dkgh,khj->dkgj", wo, R / s[:, None, :]).reshape(g.d, g.heads * g.h)


def scale_qk(w: dict, i: int, s_half: torch.Tensor, g: Geometry) -> None:
    """S_qk per KV head, equal on the two halves RoPE pairs (so it commutes with RoPE):
    q rows <- q rows * s (every query head of the group), k rows <- k rows / s."""
    s = torch.cat([s_half, s_half], dim=-1)                        # [kv, h]
    sq = s[:, None, :].expand(g.kv_heads, g.group, g.h).reshape(-1)
    sk = s.reshape(-1)
    for proj, f in (("q_proj", sq), ("k_proj", 1 / sk)):
        w[attn(i, proj)] = w[attn(i, proj)] * f[:, None]
        if attn(i, proj, "bias") in w:
            w[attn(i, proj, "bias")] = w[attn(i, proj, "bias")] * f


def scale_up_down(w: dict, i: int, s: torch.Tensor) -> None:
    """S_up_down: up's rows <- rows * s, down's columns <- columns / s."""
    w[mlp(i, "up_proj")] = w[mlp(i, "up_proj")] * s[:, None]
    w[mlp(i, "down_proj")] = w[mlp(i, "down_proj")] / s


def hadamard_down(w: dict, i: int, H: torch.Tensor) -> None:
    """H_down: the online x -> x H before down_proj is undone by W_down <- W_down H
    (H = hadamard_matrix(m, blocks=b), orthonormal: (x H)(W H)^T = x W^T)."""
    w[mlp(i, "down_proj")] = w[mlp(i, "down_proj")] @ H


# ------------------------------------------------------------------------------------------
# The learnable parameters
# ------------------------------------------------------------------------------------------
def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The polar factor U V^T of x (batched), computed in float64 on the CPU."""
    U, _, Vh = torch.linalg.svd(x.detach().double().cpu(), full_matrices=False)
    return (U @ Vh).to(x)


class Stiefel(geoopt.manifolds.CanonicalStiefel):
    """geoopt's Stiefel manifold (Cayley retraction, as the official code) whose projection, which
    RiemannianAdam applies every `stabilize` steps, takes the polar factor in float64 on the CPU.
    With geoopt's own projection (float32 SVD on the GPU) and TF32 matmuls, trained rotations on the
    H100 ended at ||R^T R - I|| ~ 1e-2; with this one and fp32 optimizer steps, at 9e-7 (measured)."""

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_orthogonal(x)

class Transforms(nn.Module):
    """All pairs of one model. Rotations live on the Stiefel manifold; scales are log-parametrised
    (always positive). A pair left out (None / False / 0) is the identity."""

    def __init__(self, g: Geometry, *, r_res: torch.Tensor | None, r_ov: torch.Tensor | None,
                 learn_rotations: bool, scales: bool, scale_qk: bool, had_down: int, device=None):
        """Build on the final device: Module.to() across devices replaces a ManifoldParameter by a plain
        Parameter, which RiemannianAdam then updates as Euclidean (rotations drift).
        had_down: 0 = no H_down, b = the block-diagonal I_b (x) H_{m/b} (True = 1, the full H)."""
        super().__init__()
        self.g = g
        stiefel = Stiefel()

        def rot(t):
            if t is None:
                return None
            t = t.to(device=device, dtype=torch.float32).contiguous()
            return geoopt.ManifoldParameter(t, manifold=stiefel) if learn_rotations else nn.Parameter(t, requires_grad=False)

        self.r_res = rot(r_res)
        self.r_ov = rot(r_ov)                                       # [L, kv, h, h]

        def zeros(*shape, on=scales):
            return nn.Parameter(torch.zeros(*shape, device=device)) if on else None

        self.log_s_attn = zeros(g.layers, g.d)
        self.log_s_ffn = zeros(g.layers, g.d)
        self.log_s_ov = zeros(g.layers, g.kv_heads, g.h)
        self.log_s_qk = zeros(g.layers, g.kv_heads, g.h // 2, on=scales and scale_qk)
        self.log_s_up_down = zeros(g.layers, g.m)
        self.had_down = int(had_down)
        if self.had_down:
            block_size(g.m, self.had_down)  # fail now, not after training, if m/b has no Hadamard

    @torch.no_grad()
    def project_rotations(self) -> None:
        """Snap every rotation to the nearest orthogonal matrix (polar factor, float64), so that the
        fused float model is exactly the original one."""
        for R in (self.r_res, self.r_ov):
            if R is not None:
                R.copy_(nearest_orthogonal(R))

    def rotation_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.r_res, self.r_ov) if p is not None and p.requires_grad]

    def scale_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("log_s")]

    def apply(self, weights: dict, dtype=None) -> dict:
        """New dict: every pair applied to the weights (computed in `dtype`, default the weights')."""
        g = self.g
        dtype = dtype or next(iter(weights.values())).dtype
        w = {k: v.to(dtype) for k, v in weights.items()}

        def cast(p):
            return None if p is None else p.to(dtype)

        if self.r_res is not None:
            rotate_residual(w, cast(self.r_res), g)
        dev = next(iter(w.values())).device
        H = hadamard_matrix(g.m, dtype, dev, blocks=self.had_down) if self.had_down else None
        ones_kv = torch.ones(g.kv_heads, g.h, dtype=dtype, device=dev)
        for i in range(g.layers):
            if self.log_s_attn is not None:
                scale_norm_output(w, f"model.layers.{i}.input_layernorm.weight",
                                  [attn(i, p) for p in READERS_ATTN], self.log_s_attn[i].to(dtype).exp())
                scale_norm_output(w, f"model.layers.{i}.post_attention_layernorm.weight",
                                  [mlp(i, p) for p in READERS_FFN], self.log_s_ffn[i].to(dtype).exp())
            if self.r_ov is not None or self.log_s_ov is not None:
                R = cast(self.r_ov[i]) if self.r_ov is not None else torch.eye(g.h, dtype=dtype, device=dev).expand(g.kv_heads, g.h, g.h)
                s = self.log_s_ov[i].to(dtype).exp() if self.log_s_ov is not None else ones_kv
                transform_ov(w, i, R, s, g)
            if self.log_s_qk is not None:
                scale_qk(w, i, self.log_s_qk[i].to(dtype).exp(), g)
            if self.log_s_up_down is not None:
                scale_up_down(w, i, self.log_s_up_down[i].to(dtype).exp())
            if H is not None:
                hadamard_down(w, i, H)
        return w


# ------------------------------------------------------------------------------------------
# Initialisation (SPEC §5)
# ------------------------------------------------------------------------------------------
def womi_residual(weights: dict, g: Geometry, gen: torch.Generator) -> torch.Tensor:
    """R_res = Q H: Q the eigenvectors of W_cat^T W_cat over every reader of the residual."""
    gram = torch.zeros(g.d, g.d, dtype=torch.float64)
    for i in range(g.layers):
        for key in [attn(i, p) for p in READERS_ATTN] + [mlp(i, p) for p in READERS_FFN]:
            W = weights[key].double().cpu()
            gram += W.T @ W
    _, Q = torch.linalg.eigh(gram)
    return Q @ random_hadamard_matrix(g.d, gen)


def womi_ov(weights: dict, g: Geometry, gen: torch.Generator) -> torch.Tensor:
    """R_ov per KV head: eigenvectors of the Gram matrix of the o_proj columns of its query heads."""
    out = torch.empty(g.layers, g.kv_heads, g.h, g.h, dtype=torch.float64)
    for i in range(g.layers):
        wo = weights[attn(i, "o_proj")].double().cpu().reshape(g.d, g.kv_heads, g.group, g.h)
        for k in range(g.kv_heads):
            cols = wo[:, k].reshape(-1, g.h)                         # every [d, h] block stacked
            _, Q = torch.linalg.eigh(cols.T @ cols)
            out[i, k] = Q @ random_hadamard_matrix(g.h, gen)
    return out


def random_hadamard_residual(g: Geometry, gen: torch.Generator) -> torch.Tensor:
    return random_hadamard_matrix(g.d, gen)


def random_hadamard_ov(g: Geometry, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.stack([random_hadamard_matrix(g.h, gen) for _ in range(g.kv_heads)])
                        for _ in range(g.layers)])
