"""Projection bases (exact and randomized SVD) and the INT4 / INT8 quantisers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shardyard.optim.projection import (
    choose_side,
    exact_basis,
    project,
    project_back,
    randomized_basis,
    sketch_generator,
    subspace_overlap,
)
from shardyard.optim.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, stochastic_round
from tests.optim.galore_helpers import one_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    yield from one_thread()


def low_rank_matrix(m: int, n: int, r: int, seed: int = 0, noise: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    return a + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (3, 40, 24)])
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_basis_orthonormal_and_side(shape: tuple[int, ...], method: str) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    side = choose_side(g.shape)
    assert side == ("right" if shape[-2] >= shape[-1] else "left")
    rank = 6
    basis = (
        exact_basis(g, rank, side)
        if method == "svd"
        else randomized_basis(g, rank, side, 4, 2, torch.Generator().manual_seed(1))
    )
    small = min(shape[-2], shape[-1])
    assert basis.shape == (*shape[:-2], small, rank)
    eye = torch.eye(rank).expand(*shape[:-2], rank, rank)
    torch.testing.assert_close(basis.transpose(-2, -1) @ basis, eye, atol=1e-5, rtol=0)
    low = project(g, basis, side)
    assert low.shape[-2:] == ((shape[-2], rank) if side == "right" else (rank, shape[-1]))
    assert project_back(low, basis, side).shape == g.shape


def test_projection_keeps_top_singular_energy() -> None:
    g = low_rank_matrix(64, 32, 4)
    for side in ("left", "right"):
        basis = exact_basis(g, 4, side)
        rec = project_back(project(g, basis, side), basis, side)
        assert (rec - g).norm() / g.norm() < 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_close_to_exact_on_low_rank(side: str) -> None:
    g = low_rank_matrix(256, 128, 8, seed=3)
    exact = exact_basis(g, 8, side)
    approx = randomized_basis(g, 8, side, oversample=8, power_iters=2, generator=torch.Generator().manual_seed(0))
    assert subspace_overlap(exact, approx) > 0.9999
    rec = project_back(project(g, approx, side), approx, side)
    assert (rec - g).norm() / g.norm() < 2e-3


def test_randomized_is_deterministic_per_seed() -> None:
    g = torch.randn(40, 30)
    a = randomized_basis(g, 5, "right", 4, 1, sketch_generator(0, 3, 10, g.device))
    b = randomized_basis(g, 5, "right", 4, 1, sketch_generator(0, 3, 10, g.device))
    assert torch.equal(a, b)


def test_int4_roundtrip() -> None:
    x = torch.randn(30, 7)  # 210 elements: a short last group
    q, scales = quantize_int4(x, 64)
    assert q.dtype == torch.uint8 and q.numel() == 4 * 64 // 2 and scales.numel() == 4
    y = dequantize_int4(q, scales, x.shape, 64)
    step = x.abs().max() / 7
    assert (y - x).abs().max() <= step / 2 + 1e-6
    orth = exact_basis(torch.randn(64, 32), 8, "left")
    deq = dequantize_int4(*quantize_int4(orth, 64), orth.shape, 64)
    assert subspace_overlap(orth, torch.linalg.qr(deq)[0]) > 0.95


def test_stochastic_rounding_unbiased() -> None:
    x = torch.full((200_000,), 0.3)
    r = stochastic_round(x, torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {0.0, 1.0}
    assert abs(r.mean().item() - 0.3) < 5e-3  # ~4.6 sigma
    y = torch.linspace(-3, 3, 1001).repeat(400)
    ry = stochastic_round(y, torch.Generator().manual_seed(1))
    assert (ry.view(400, -1).mean(0) - y[:1001]).abs().max() < 0.12  # 5 sigma of a 400-sample mean
    assert torch.equal(stochastic_round(torch.arange(-5.0, 5.0)), torch.arange(-5.0, 5.0))


def test_int8_quantize_roundtrip_and_sr_mean() -> None:
    x = torch.randn(1000)
    q, s = quantize_int8(x, 128, stochastic=False)
    assert q.dtype == torch.int8
    assert (dequantize_int8(q, s, 128) - x).abs().max() <= s.max() / 2 + 1e-7
    reps = torch.stack(
        [dequantize_int8(*quantize_int8(x, 128, True, torch.Generator().manual_seed(i)), 128) for i in range(200)]
    )
    assert (reps.mean(0) - x).abs().max() < 0.4 * s.max()
