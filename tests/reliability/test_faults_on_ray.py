"""Real faults on a real 2-node Ray cluster (two raylets on this machine): SIGTERM to the driver of
`shardyard run`, then a re-run in which a training worker is SIGKILLed by its pid and then its
whole node's raylet is killed. Starting Ray worker groups is what costs time, so the faults share
runs, and the uninterrupted reference runs on a plain gloo group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.preemption import EXIT_STOPPED
from shardyard.runtime.run_events import read_events
from shardyard.runtime.watchdog import read_heartbeats
from tests.helpers import ROOT, SHARDYARD, tiny_spec_yaml, train_losses, train_on_gloo

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.kills_nodes]
TRAINING = "{steps: 48, batch_size: 4, eval_every: 0, eval_bytes: 2048, log_every: 1}"
RESOURCES = "{workers: 2, cpus_per_worker: 1, max_failures: 2}"


def job_yaml(tmp_path: Path, name: str, **sections: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    parts = {
        "training": TRAINING,
        "resources": RESOURCES,
        "checkpoint": f"{{dir: {tmp_path / 'runs'}, every: 4, keep: 3}}",
        **sections,
    }
    path.write_text(tiny_spec_yaml(name, tmp_path / "runs", **parts))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run's losses: the same Trainer on 2 gloo ranks without Ray (what Ray Train
    runs is the same code on the same kind of process group; no worker group to start)."""
    tmp = tmp_path_factory.mktemp("reference")
    train_on_gloo(load_spec_text(job_yaml(tmp, "reference").read_text()), tmp / "reference", 2)
    losses = train_losses(tmp / "reference")
    assert sorted(losses) == list(range(1, 49))
    return losses


def start_run(cluster: Any, spec: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*SHARDYARD, "run", str(spec), "--address", cluster.address],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def wait_for(condition, timeout: float = 120, what: str = "") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)  # each poll parses the run's files: a busy loop competes with the job for 2 cores
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(run_dir: Path) -> int:
    return max(train_losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def assert_same_run(reference: dict[int, float], run_dir: Path) -> None:
    losses = train_losses(run_dir)
    assert sorted(losses) == sorted(reference)
    for step in reference:
        assert abs(losses[step] - reference[step]) < 1e-5, (step, losses[step], reference[step])


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def new_attempt_training(run_dir: Path, after: float) -> dict[int, dict]:
    """Heartbeats of an attempt that started after `after`, once it has logged two more steps."""
    beats = wait_for(
        lambda: (b := read_heartbeats(RunDir(run_dir).heartbeats, since=after + 0.5)) and len(b) == 2 and b,
        what="a new attempt",
    )
    lines = metric_lines(run_dir)
    wait_for(lambda: metric_lines(run_dir) >= lines + 2, what="the new attempt to train")
    return beats


def retry_events(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir)[0] if e["event"] == "retry"]


def test_a_preempted_run_survives_a_sigkill_and_a_lost_node_and_ends_like_an_uninterrupted_run(
    cluster: Any, reference: dict[int, float], tmp_path: Path
) -> None:
    """Both workers run on the non-head node (the head's CPUs are held by a placeholder actor).
    1. SIGTERM to the driver of `shardyard run`: checkpoint at the next step, exit 75.
    2. The same command again resumes; rank 1 is SIGKILLed by its pid.
    3. The workers' node loses its raylet (and the head is freed): the job restarts on the head.
    The losses of every step equal the uninterrupted run's; each fault printed one line."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    other = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    holder = (
        ray.remote(num_cpus=2)(Placeholder)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.head_node.node_id, soft=False))
        .remote()
    )
    ray.get(holder.ping.remote())
    spec = job_yaml(tmp_path, "faults")
    run_dir = tmp_path / "runs" / "faults"

    proc = start_run(cluster, spec, tmp_path / "first.out")
    wait_for(lambda: steps_done(run_dir) >= 2, what="training to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_STOPPED, (tmp_path / "first.out").read_text()[-3000:]
    first = (tmp_path / "first.out").read_text()
    stopped_at = steps_done(run_dir)
    assert 2 <= stopped_at < 40, first
    assert f"stopped at step {stopped_at}/48" in first and "continue with: shardyard run" in first, first
    assert "Traceback" not in first

    second_start = time.time()
    proc = start_run(cluster, spec, tmp_path / "second.out")
    beats = new_attempt_training(run_dir, second_start)
    assert {b["node_id"] for b in beats.values()} == {other.node_id}
    os.kill(beats[1]["pid"], signal.SIGKILL)
    wait_for(lambda: len(retry_events(run_dir)) == 1, what="the SIGKILL to end an attempt")
    new_attempt_training(run_dir, retry_events(run_dir)[0]["time"])
    os.kill(other.all_processes["raylet"][0].process.pid, signal.SIGKILL)
    ray.kill(holder)
    assert proc.wait(timeout=300) == 0, (tmp_path / "second.out").read_text()[-4000:]
    second = (tmp_path / "second.out").read_text()
    assert f"resumed from step {stopped_at}" in second
    killed, node = (e["message"] for e in retry_events(run_dir))
    assert killed.startswith(f"rank 1 (pid {beats[1]['pid']} ") and "its process died" in killed, killed
    # both ranks, also when Ray Train had polled only the first (runtime/failure_policy: from the heartbeats)
    assert node == f"ranks 0, 1 on node {other.node_id[:8]} died: their node died (raylet lost)", node
    assert second.count("[shardyard] fault:") == 2 and "restarting from the checkpoint at step" in second, second
    assert "Traceback" not in second and (run_dir / "driver.log").stat().st_size > 0
    assert_same_run(reference, run_dir)
    cluster.remove_node(other, allow_graceful=False)


class Placeholder:
    def ping(self) -> bool:
        return True
