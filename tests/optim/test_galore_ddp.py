"""Two real gloo workers (spawned processes, DDP) stay bitwise identical under GaLore / Q-GaLore:
DDP averages gradients before step(), and every rank computes the same projection (deterministic
SVD, seeded randomized sketch, seeded stochastic rounding) or receives rank 0's by broadcast."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.optim.galore_helpers import spawn_ddp


@pytest.mark.distributed
def test_two_gloo_workers_keep_identical_weights() -> None:
    spawn_ddp(world=2, steps=5)


@pytest.mark.slow
def test_q_galore_with_a_lowrank_ffn_trains_on_two_gloo_ranks(tmp_path: Path) -> None:
    from shardyard.platform.spec import load_spec_text
    from tests.helpers import tiny_spec_yaml, train_losses, train_on_gloo

    spec = load_spec_text(
        tiny_spec_yaml(
            "galore",
            tmp_path / "runs",
            model="{kind: dense, width: 64, depth: 2, heads: 2, ffn: {kind: lowrank, hidden: 128, rank: 16, "
            "self_guided: 0.5}}",
            optim="{kind: q_galore_adamw, lr: 3.0e-3, schedule: {warmup: 2}, galore: {rank: 8, update_gap: 5}}",
            training="{steps: 16, batch_size: 4, eval_every: 8, eval_bytes: 2048, log_every: 1}",
        )
    )
    train_on_gloo(spec, tmp_path / "runs" / "galore", 2)
    losses = train_losses(tmp_path / "runs" / "galore")
    assert sorted(losses) == list(range(1, 17)) and losses[16] < losses[1] - 0.5
