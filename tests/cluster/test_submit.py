"""`shardyard cluster up`, `submit`, `status`, `logs`, `list`, `stop` against a real local Ray head
with token authentication."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli, stop_shared_ray, tiny_spec_yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]
PORT, DASHBOARD = 6389, 8275
ADDRESS = f"http://127.0.0.1:{DASHBOARD}"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    # The session's shared cluster (tests.helpers) runs its own per-node agents on Ray's default ports,
    # where this head's job agent would then fail to listen ("No available agent to submit job"): stop
    # it; the next test that needs it starts it again.
    stop_shared_ray()
    token = tmp_path_factory.mktemp("head") / "auth_token"
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    up = run_cli("cluster", "up", "--num-cpus", "3", "--port", str(PORT), "--dashboard-port", str(DASHBOARD), env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert token.exists() and "token authentication on" in up.stdout
    try:
        yield env
    finally:
        down = run_cli("cluster", "down", "--port", str(PORT), env=env)
        from shardyard.cluster.head import head_processes

        assert f"Ray head on port {PORT} stopped" in down.stdout, down.stdout + down.stderr
        assert head_processes(PORT) == []  # only this head's daemons were stopped, and all of them


def test_submit_status_logs_list(ray_head: dict, tmp_path: Path) -> None:
    """An elastic job (workers 1..2, a global batch of 8) goes through Ray Jobs as it does through
    `shardyard run`: the elastic scaling policy in the controller, the split per size in the workers."""
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "submitted",
            tmp_path / "runs",
            training="{steps: 12, batch_size: 4, global_batch: 8, eval_every: 6, eval_bytes: 2048, log_every: 2}",
            resources="{workers: {min: 1, max: 2}, cpus_per_worker: 1, max_failures: 1}",
        )
    )
    proc = run_cli("submit", str(spec), "--address", ADDRESS, "--set", "checkpoint.every=6", env=ray_head)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("submitted-")
    deadline = time.time() + 420
    state = ""
    while time.time() < deadline:
        state = run_cli("status", job_id, "--address", ADDRESS, env=ray_head).stdout.strip()
        if state.split(":")[0] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = run_cli("logs", job_id, "--address", ADDRESS, env=ray_head).stdout
    assert state.startswith("SUCCEEDED"), state + logs[-4000:]
    assert "[shardyard] step 12/12" in logs and "val " in logs and " bpb +- " in logs  # plain lines in a job log
    records = [
        json.loads(line) for line in (tmp_path / "runs" / "submitted" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r.get("kind") == "train"]
    assert train and all(r["world_size"] == 2 for r in train), train[-1]  # max: the head has room for 2
    followed = run_cli("logs", job_id, "--follow", "--address", ADDRESS, env=ray_head, timeout=60)
    assert followed.returncode == 0 and "done at step 12/12" in followed.stdout
    listing = run_cli("list", "--address", ADDRESS, env=ray_head).stdout
    assert job_id in listing and "SUCCEEDED" in listing
    stop = run_cli("stop", job_id, "--address", ADDRESS, env=ray_head)
    assert stop.returncode == 0 and "already finished" in stop.stdout
    missing = run_cli("status", "no-such-job", "--address", ADDRESS, env=ray_head)
    assert missing.returncode == 3 and "no job 'no-such-job'" in missing.stderr


def test_a_wrong_token_is_refused(ray_head: dict, tmp_path: Path) -> None:
    (tmp_path / "wrong").write_text("f" * 64)
    (tmp_path / "wrong").chmod(0o600)  # private, so the cluster (not the mode check) is what refuses it
    proc = run_cli("list", "--address", ADDRESS, env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")})
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr


def test_stop_a_running_job(ray_head: dict, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "stopped",
            tmp_path / "runs",
            training="{steps: 5000, batch_size: 4, eval_every: 1000, eval_bytes: 2048, log_every: 10}",
        )
    )
    job_id = run_cli("submit", str(spec), "--address", ADDRESS, env=ray_head).stdout.strip().splitlines()[-1]
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until it is really training
        if "RUNNING" in run_cli("status", job_id, "--address", ADDRESS, env=ray_head).stdout:
            break
        time.sleep(2)
    stop = run_cli("stop", job_id, "--address", ADDRESS, env=ray_head)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    state = ""
    while time.time() < deadline + 120:
        state = run_cli("status", job_id, "--address", ADDRESS, env=ray_head).stdout.strip()
        if not state.startswith(("RUNNING", "PENDING")):
            break
        time.sleep(2)
    assert state.startswith("STOPPED"), state
