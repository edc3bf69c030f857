"""An EP run with LSH-compressed dispatch on a real 2-node Ray cluster (the session's) that crashes,
is restarted by Ray Train and resumes from its checkpoint equals an uninterrupted one: the rotation schedule (refreshed every 3
micro-batches, so the resume lands in a different rotation epoch than the start) is restored exactly.
Its 4 workers (EP 4, hierarchical all-to-all) run 2 on each node and learn their node rank from Ray.
The uninterrupted reference runs the same Trainer on 4 gloo ranks faking the same two nodes, without
Ray (no worker group to start; tests/reliability/test_faults_on_ray.py does the same)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec_text
from shardyard.runtime.entry import run_training
from tests.helpers import tiny_spec_yaml, train_losses, train_on_gloo, two_node_ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.ray]


def spec(root: Path, name: str):
    return load_spec_text(
        tiny_spec_yaml(
            name,
            root / "runs",
            training="{steps: 10, batch_size: 2, eval_every: 5, eval_bytes: 2048, log_every: 1}",
            resources="{workers: 4, cpus_per_worker: 1, max_failures: 1}",
            checkpoint=f"{{dir: {root / 'runs'}, every: 5, keep: 2}}",
            parallel="{expert_parallel: 4, a2a: hierarchical, dispatch: "
            "{payload: bf16, lsh: {hashes: 4, rotation_refresh: 3, error_every: 2}}}",
        )
    )


def test_two_node_expert_parallel_lsh_trains_and_resumes(tmp_path: Path) -> None:
    import ray

    train_on_gloo(spec(tmp_path, "clean"), tmp_path / "runs" / "clean", 4, ranks_per_node=2)
    # rank 0 raises at step 7 (after the step-5 checkpoint); Ray Train restarts the group, which
    # resumes from step 5 in fresh workers, the LSH schedule taken from the checkpoint. The workers
    # read the fault step from their environment: connect with it set.
    with two_node_ray_cluster({"SHARDYARD_FAULT_STEP": "7"}):
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        resumed = run_training(spec(tmp_path, "crashed"), tmp_path / "runs" / "crashed")
    assert resumed.error is None and resumed.final_step == 10, resumed.error
    assert (tmp_path / "runs" / "crashed" / ".injected_fault_done").exists()
    records = map(json.loads, (tmp_path / "runs" / "crashed" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in records if r.get("event") == "resume"] == [5]
    a, b = train_losses(tmp_path / "runs" / "clean"), train_losses(tmp_path / "runs" / "crashed")
    assert sorted(a) == sorted(b) == list(range(1, 11)) and b[10] < b[1]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # (node rank, local rank) of each worker, as Ray placed the restarted group: two on each node
    placements = [
        tuple(json.loads(p.read_text())["node_local"])
        for p in sorted((tmp_path / "runs" / "crashed").glob("topology-rank*.json"))
    ]
    assert sorted(placements) == [(0, 0), (0, 1), (1, 0), (1, 1)], placements
