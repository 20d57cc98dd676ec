"""Hadamard matrices of order 2^k * b (SPEC §3), one construction shared by calibration,
the PyTorch reference path and the CUDA kernels (which read the H_b tables built here).

Sylvester's construction gives 2^k; Paley's constructions give the small factors b.
The block-diagonal I_blocks (x) H_{n/blocks} (down_proj's H_down with `hadamard_blocks` > 1) is
what lets vLLM's tensor parallelism split H_down: each rank applies I_{blocks/tp} (x) H_{n/blocks}
to its own slice, with no communication.
"""
from __future__ import annotations

import functools
import itertools

import torch

# Orders b with a Paley construction: (construction, q). Order 40 needs no entry: 40 * 2^k = 20 * 2^(k+1).
_PALEY = {12: ("I", 11), 20: ("I", 19), 28: ("I", 27), 36: ("II", 17), 52: ("II", 25),
          60: ("I", 59), 108: ("I", 107), 140: ("I", 139)}
SUPPORTED_B = (1,) + tuple(sorted(_PALEY))


def _prime_power(q: int) -> tuple[int, int]:
    for p in range(2, q + 1):
        if q % p == 0:
            n, r = 0, q
            while r % p == 0:
                r, n = r // p, n + 1
            if r != 1:
                raise ValueError(f"{q} is not a prime power")
            return p, n
    raise ValueError(q)


def _field(q: int):
    """Elements 0..q-1 of GF(q) (q = p^n, n <= 3) with addition and multiplication tables."""
    p, n = _prime_power(q)
    if n == 1:
        elems = list(range(q))
        add = [[(a + b) % p for b in elems] for a in elems]
        mul = [[(a * b) % p for b in elems] for a in elems]
        return add, mul
    if n > 3:
        raise ValueError(f"GF({q}) not supported")
    # A monic polynomial of degree 2 or 3 with no root in GF(p) is irreducible.
    for tail in itertools.product(range(p), repeat=n):
        if all((x**n + sum(c * x**i for i, c in enumerate(tail))) % p for x in range(p)):
            break
    digits = [tuple((e // p**i) % p for i in range(n)) for e in range(q)]
    index = {d: e for e, d in enumerate(digits)}

    def polymul(a, b):
        prod = [0] * (2 * n - 1)
        for i, ai in enumerate(a):
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
        for k in range(2 * n - 2, n - 1, -1):  # reduce x^k with x^n = -tail
            c, prod[k] = prod[k], 0
            for i, t in enumerate(tail):
                prod[k - n + i] = (prod[k - n + i] - c * t) % p
        return tuple(prod[:n])

    add = [[index[tuple((x + y) % p for x, y in zip(digits[a], digits[b]))] for b in range(q)] for a in range(q)]
    mul = [[index[polymul(digits[a], digits[b])] for b in range(q)] for a in range(q)]
    return add, mul


def _jacobsthal(q: int) -> torch.Tensor:
    add, mul = _field(q)
    squares = {mul[a][a] for a in range(1, q)}
    neg = [next(b for b in range(q) if add[a][b] == 0) for a in range(q)]
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[add[i][neg[j]]] for j in range(q)] for i in range(q)], dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _small_hadamard(b: int) -> torch.Tensor:
    if b == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _PALEY[b]
    Q = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if kind == "I":  # q = 3 mod 4: H = I + [[0, 1], [-1, Q]]
        S = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([-ones, Q], 1)], 0)
        return torch.eye(q + 1, dtype=torch.float64) + S
    # q = 1 mod 4: conference matrix C, H = C x [[1,-1],[-1,-1]] + I x [[1,1],[1,-1]]
    C = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([ones, Q], 1)], 0)
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def factor(n: int) -> tuple[int, int]:
    """(2^k, b) with n = 2^k * b and b a supported small order; largest 2^k first."""
    for b in SUPPORTED_B:
        if n % b == 0 and (n // b) & (n // b - 1) == 0:
            return n // b, b
    raise ValueError(
        f"no Hadamard matrix of order {n}: need 2^k * b with b in {SUPPORTED_B} "
        f"(use a block-diagonal Hadamard, or a size with such a factor)")


def small_factor(n: int) -> torch.Tensor:
    """The unnormalised H_b (±1 entries) of n = 2^k * b, float64."""
    return _small_hadamard(factor(n)[1]).clone()


@functools.lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor:
    p2, b = factor(n)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p2:  # Sylvester order, as vLLM's fast_hadamard_transform
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return torch.kron(H, _small_hadamard(b)) / n**0.5


def hadamard_matrix(n: int, dtype=torch.float64, device=None, blocks: int = 1) -> torch.Tensor:
    """Orthonormal I_blocks kron H_{n/blocks}, H_m = (H_{2^k} kron H_b) / sqrt(m) (blocks = 1: the full H_n)."""
    H = _hadamard(block_size(n, blocks))
    return torch.kron(torch.eye(blocks, dtype=torch.float64), H).to(dtype=dtype, device=device)


def random_hadamard_matrix(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """diag(random signs) @ H: orthonormal, the QuaRot/WOMI randomised Hadamard."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return (signs[:, None] * _hadamard(n)).to(dtype)


def apply_hadamard(x: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """x @ hadamard_matrix(n, blocks=blocks) along the last dim, as a fast transform (no n x n matrix for
    the 2^k part); each block of n/blocks columns is transformed on its own."""
    n = block_size(x.shape[-1], blocks)
    p2, b = factor(n)
    shape, dtype = x.shape, x.dtype
    y = x.reshape(-1, p2, b).to(torch.float32 if dtype != torch.float64 else dtype)
    h = 1
    while h < p2:  # butterfly over the 2^k index (Sylvester H is symmetric)
        y = y.view(y.shape[0], p2 // (2 * h), 2, h, b)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2).reshape(-1, p2, b)
        h *= 2
    if b > 1:
        y = y @ _small_hadamard_on(b, y.device, y.dtype)
    return (y / n**0.5).reshape(shape).to(dtype)


_SMALL_ON: dict = {}


def _small_hadamard_on(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """H_b already on the device: a copy from the CPU inside a CUDA graph capture is an error
    (vLLM replays the compiled model in graphs); the plugin fills this at load time (warm)."""
    key = (b, str(device), dtype)
    if key not in _SMALL_ON:
        _SMALL_ON[key] = _small_hadamard(b).to(device=device, dtype=dtype)
    return _SMALL_ON[key]


def warm(n: int, blocks: int, device: torch.device) -> None:
    """Put the H_b that apply_hadamard(x [.., n], blocks) multiplies by on `device` now (at load
    time), so that torch.compile traces a lookup, not a copy from the CPU."""
    _, b = factor(block_size(n, blocks))
    if b > 1:
        _small_hadamard_on(b, torch.device(device), torch.float32)


def block_size(n: int, blocks: int) -> int:
    """n / blocks, checked: blocks divides n and a Hadamard matrix of that order exists."""
    if not isinstance(blocks, int) or blocks < 1 or n % blocks:
        raise ValueError(f"hadamard_blocks={blocks!r} does not divide the Hadamard size {n}")
    try:
        factor(n // blocks)
    except ValueError as e:
        raise ValueError(f"hadamard_blocks={blocks}: blocks of size {n // blocks} = {n} / {blocks}: {e}") from None
    return n // blocks


def default_blocks(n: int, most: int = 8) -> int:
    """Calibration's default H_down blocks for an intermediate size n: the largest power of two
    b <= `most` with I_b (x) H_{n/b} constructible, so vLLM can split H_down at every tensor
    parallel size dividing b (8: TP 1, 2, 4, 8). 1 (the full H_n) when no larger b works."""
    b = most
    while b > 1:
        try:
            block_size(n, b)
            return b
        except ValueError:
            b //= 2
    return 1
