"""A real 2-node Ray cluster on this machine (two raylets): Ray Train places the workers across the
nodes, node ranks come from Ray, and the MoE job trains with expert parallelism over a
hierarchical all-to-all built from that topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec_text
from shardyard.runtime.entry import run_training
from tests.helpers import tiny_spec_yaml, train_losses, two_node_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_node_cluster_hierarchical_expert_parallel(tmp_path: Path) -> None:
    import ray

    with two_node_ray_cluster():
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        text = tiny_spec_yaml(
            "twonode",
            tmp_path / "runs",
            training="{steps: 8, batch_size: 2, eval_every: 4, eval_bytes: 2048, log_every: 1}",
            resources="{workers: 4, cpus_per_worker: 1, max_failures: 0}",
            parallel="{expert_parallel: 4, a2a: hierarchical}",
        )
        spec = load_spec_text(text)
        result = run_training(spec, tmp_path / "runs" / "twonode")
        assert result.error is None, result.error
        assert result.final_step == 8
        losses = train_losses(tmp_path / "runs" / "twonode")
        assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
        # Workers really ran on both nodes, and each learned its node rank from Ray.
        placements = read_placements(tmp_path / "runs" / "twonode")
        assert sorted(placements) == [(0, 0), (0, 1), (1, 0), (1, 1)], placements


def read_placements(run_dir: Path) -> list[tuple[int, int]]:
    import json

    return [tuple(json.loads(p.read_text())["node_local"]) for p in sorted(run_dir.glob("topology-rank*.json"))]
