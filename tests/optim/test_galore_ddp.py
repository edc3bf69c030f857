"""Two real gloo workers (spawned processes, DDP) stay bitwise identical under GaLore / Q-GaLore:
DDP averages gradients before step(), and every rank computes the same projection (deterministic
SVD, seeded randomized sketch, seeded stochastic rounding) or receives rank 0's by broadcast."""

from __future__ import annotations

import pytest

from tests.optim.galore_helpers import spawn_ddp


@pytest.mark.distributed
def test_two_gloo_workers_keep_identical_weights() -> None:
    spawn_ddp(world=2, steps=5)
