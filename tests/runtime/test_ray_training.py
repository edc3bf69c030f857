"""Real Ray Train runs through `shardyard run` on the session's Ray cluster: 2 gloo workers,
checkpoints, restart, wandb offline. The faulty run is compared with one uninterrupted run of the same
Trainer on a plain gloo group (tests/runtime/conftest.py); a crash under ZeRO-2 and a kill mid-save,
started again by hand on gloo: tests/runtime/test_fault_resume.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.runtime import checkpoint as ckpt
from shardyard.tracking.expert_load import read_expert_load
from shardyard.tracking.logger import read_metrics
from tests.helpers import (
    assert_same_series,
    run_job,
    tiny_spec_yaml,
    train_grad_norms,
    train_losses,
)
from tests.runtime.fault_runs import assert_same_losses, fault_spec

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.ray]


def test_two_worker_moe_run_learns_checkpoints_and_logs(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "learns",
            tmp_path / "runs",
            training="{steps: 40, batch_size: 8, eval_every: 20, eval_bytes: 2048, log_every: 1}",
        )
    )
    proc = run_job(spec)  # the embedded cluster itself: tests/safety/test_security.py runs a job on one
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done at step 40/40" in proc.stdout
    run_dir = tmp_path / "runs" / "learns"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)  # from ~5.5 nats: the model learns byte statistics
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert {
        "loss",
        "bpb",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "aux_loss",
        "moe/layer0/util_max",
        "moe/layer0/dead",
        "time/forward_ms_max",
        "mem/peak_rss_gib_max",
    } <= set(train[-1])
    steps, per_layer = read_expert_load(run_dir)
    assert steps.tolist() == list(range(1, 41))
    assert (per_layer[0].sum(axis=1) == 2 * 8 * 64 * 2).all()  # workers x batch x seq x top_k per step
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_bpb"] < evals[0]["val_bpb"] + 0.5
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 2  # checkpoint.keep
    assert (run_dir / "spec.yaml").exists()
    wandb_logs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_logs) == 1 and wandb_logs[0].stat().st_size > 0
    assert f"shardyard sync {run_dir}" in proc.stdout
    assert f"report {run_dir / 'report.html'}" in proc.stdout  # every run ends with a page to open
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert "\r" not in proc.stdout and "[shardyard] step 40/40" in proc.stdout  # plain lines when redirected


def test_a_worker_killed_during_a_background_write_resumes_from_the_previous_checkpoint(
    tmp_path: Path, uninterrupted: Path
) -> None:
    """checkpoint.async: the last rank's process exits in the background write of the step-8 checkpoint
    (its files stored, the manifest not yet written) while the training thread goes on: Ray Train
    restarts the group from step 4, the newest complete checkpoint, and the run ends with the
    uninterrupted (synchronous) run's losses and gradient norms; every async checkpoint left is complete."""
    marker = tmp_path / "killed"
    killed = run_job(
        fault_spec(tmp_path),
        "--set",
        "name=killed_async",
        "--set",
        "checkpoint.async=true",
        env={"SHARDYARD_KILL_IN_SAVE": f"8:{marker}"},
    )
    assert killed.returncode == 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert marker.read_text() == "8"
    assert "resumed from step 4" in killed.stdout + killed.stderr
    run_dir = tmp_path / "runs" / "killed_async"
    assert_same_losses(run_dir, uninterrupted, 1e-5)
    assert_same_series(train_grad_norms(run_dir), train_grad_norms(uninterrupted), 1e-5, "grad_norm")
    stored = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert stored and all(ckpt.verify_checkpoint(path, full=True) is None for path in stored), stored
