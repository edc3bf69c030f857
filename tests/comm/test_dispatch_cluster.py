"""An EP run with LSH-compressed dispatch on a real 2-node Ray cluster trains, and a run that crashes
and resumes from its checkpoint equals an uninterrupted one: the rotation schedule (refreshed every 3
micro-batches, so the resume lands in a different rotation epoch than the start) is restored exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec_text
from shardyard.runtime.entry import run_training
from tests.helpers import tiny_spec_yaml, train_losses, two_node_ray_cluster

pytestmark = pytest.mark.slow


def test_two_node_expert_parallel_lsh_trains_and_resumes(tmp_path: Path) -> None:
    import ray

    with two_node_ray_cluster() as cluster:
        runs = {}

        def spec(name: str, max_failures: int):
            return load_spec_text(
                tiny_spec_yaml(
                    name,
                    tmp_path / "runs",
                    training="{steps: 10, batch_size: 2, eval_every: 5, eval_bytes: 2048, log_every: 1}",
                    resources=f"{{workers: 4, cpus_per_worker: 1, max_failures: {max_failures}}}",
                    checkpoint=f"{{dir: {tmp_path / 'runs'}, every: 5, keep: 2}}",
                    parallel="{expert_parallel: 4, a2a: hierarchical, dispatch: "
                    "{payload: bf16, lsh: {hashes: 4, rotation_refresh: 3, error_every: 2}}}",
                )
            )

        clean = run_training(spec("clean", 0), tmp_path / "runs" / "clean")
        assert clean.error is None and clean.final_step == 10, clean.error
        runs["clean"] = train_losses(tmp_path / "runs" / "clean")
        # crash at step 7 (after the step-5 checkpoint) with no restarts; then run the job again:
        # it resumes from step 5 in a fresh worker group, LSH schedule from the checkpoint
        # the workers read the fault step from their environment: reconnect with it set
        ray.shutdown()
        ray.init(
            address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": {"SHARDYARD_FAULT_STEP": "7"}}
        )
        crashed = run_training(spec("crashed", 0), tmp_path / "runs" / "crashed")
        assert crashed.error is not None
        # rank 0 left a marker: the rerun does not fault again
        resumed = run_training(spec("crashed", 0), tmp_path / "runs" / "crashed")
        assert resumed.error is None and resumed.final_step == 10, resumed.error
        runs["crashed"] = train_losses(tmp_path / "runs" / "crashed")
        assert (tmp_path / "runs" / "crashed" / ".injected_fault_done").exists()
        a, b = runs["clean"], runs["crashed"]
        assert sorted(a) == sorted(b) == list(range(1, 11)) and a[10] < a[1]
        for step in a:
            assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
