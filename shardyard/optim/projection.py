"""GaLore projections: orthonormal bases of a gradient's dominant subspace, exact or randomized.

Shapes. A projected parameter is a matrix [m, n] or a stack of them [E, m, n] (one projector per
expert slice, batched). The side follows GaLore's rule: for m >= n ("right") the basis V [n, r]
spans the top right singular vectors and the low-rank gradient is G V [m, r]; otherwise ("left")
U [m, r] spans the top left singular vectors and the low-rank gradient is U^T G [r, n]. Either way
the optimizer moments hold max(m, n) * r numbers instead of m * n.

Randomized (GaLore 2): Halko-Martinsson-Tropp range finder. With k = r + oversample Gaussian test
vectors, Y = (G G^T)^q G Omega (re-orthonormalised after every product), Q = qr(Y), then an exact
SVD of the small [k, n] matrix Q^T G. Cost O(mnk (2q + 2)) instead of O(mn min(m, n)).
The test matrix comes from a generator seeded by (seed, parameter index, step), so every
data-parallel rank and every resumed run draws the same sketch without saving RNG state.
"""

from __future__ import annotations

from typing import Literal

import torch

Side = Literal["left", "right"]


def choose_side(shape: torch.Size | tuple[int, ...]) -> Side:
    m, n = shape[-2], shape[-1]
    return "right" if m >= n else "left"


def sketch_generator(seed: int, param_index: int, step: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device="cpu" if torch.device(device).type == "meta" else device)  # meta: memory prediction
    gen.manual_seed((seed * 1_000_003 + param_index * 10_007 + step) % (2**63 - 1))
    return gen


def exact_basis(matrix: torch.Tensor, rank: int, side: Side) -> torch.Tensor:
    """Top-`rank` singular vectors of matrix [..., m, n]: U [..., m, r] (left) or V [..., n, r] (right)."""
    u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    if side == "left":
        return u[..., :, :rank].contiguous()
    return vh[..., :rank, :].transpose(-2, -1).contiguous()


def randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    side: Side,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomized approximation of `exact_basis` (same shapes, orthonormal columns)."""
    a = matrix.float()
    if side == "right":  # right singular vectors of A are left singular vectors of A^T
        a = a.transpose(-2, -1)
    m, n = a.shape[-2], a.shape[-1]
    k = min(rank + oversample, m, n)
    omega = torch.randn(*a.shape[:-2], n, k, generator=generator, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    at = a.transpose(-2, -1)
    for _ in range(power_iters):
        w, _ = torch.linalg.qr(at @ q)
        q, _ = torch.linalg.qr(a @ w)
    ub, _, _ = torch.linalg.svd(q.transpose(-2, -1) @ a, full_matrices=False)
    return (q @ ub[..., :, :rank]).contiguous()


def compute_basis(
    grad: torch.Tensor,
    rank: int,
    side: Side,
    method: str,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if method == "svd":
        return exact_basis(grad, rank, side)
    if method == "randomized":
        return randomized_basis(grad, rank, side, oversample, power_iters, generator)
    raise ValueError(f"unknown projection {method!r}; available: svd, randomized")


def project(grad: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    if side == "left":
        return basis.transpose(-2, -1) @ grad
    return grad @ basis


def project_back(low: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    if side == "left":
        return basis @ low
    return low @ basis.transpose(-2, -1)


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """||old^T new||_F^2 / r in [0, 1], averaged over expert slices: 1 = same subspace.

    Invariant to the sign and order of singular vectors, unlike a flat cosine of the matrices.
    """
    r = old.shape[-1]
    return float(((old.transpose(-2, -1) @ new).pow(2).sum(dim=(-2, -1)) / r).mean())
