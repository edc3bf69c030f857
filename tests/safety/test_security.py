"""Security: token files, the upload allow-list, secrets that reach workers and nowhere else, the
sockets a local cluster listens on, and cluster configs that keep the dashboard off 0.0.0.0."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from shardyard.cli.main import main
from shardyard.cluster import auth
from shardyard.cluster.jobs import UPLOAD_ALLOW, stage_upload
from shardyard.cluster.listening import Listener, describe, listeners_of
from shardyard.cluster.secret_env import worker_env
from shardyard.platform.errors import SpecError
from shardyard.platform.spec import load_spec_text, spec_to_yaml
from tests.helpers import ROOT, SHARDYARD, tiny_spec_yaml


# ------------------------------------------------------------------------------------- tokens
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    token = tmp_path / "auth_token"
    token.write_text("a" * 64)
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(auth.UnsafeTokenFile, match=r"readable by others \(mode 0644\); run `chmod 600"):
        auth.ensure_token(generate=False)
    assert main(["list", "--address", "http://127.0.0.1:9"]) == 3  # the CLI: a clear error, no traceback
    assert "readable by others" in capsys.readouterr().err
    token.chmod(0o640)  # group-readable is refused too
    with pytest.raises(auth.UnsafeTokenFile):
        auth.ensure_token(generate=True)  # never silently replaced either
    link = tmp_path / "link"
    link.symlink_to(token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(link))
    with pytest.raises(auth.UnsafeTokenFile, match="regular file"):
        auth.ensure_token(generate=False)


def test_a_new_token_is_private_from_its_first_byte(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray" / "auth_token"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    old_umask = os.umask(0o000)  # even with a permissive umask
    try:
        path = auth.ensure_token(generate=True)
    finally:
        os.umask(old_umask)
    token = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["auth_token"]  # no temp file left behind
    assert auth.ensure_token(generate=True) == path and path.read_text() == token  # one token, kept
    assert auth.ensure_token(generate=False) == path and path.read_text() == token


# ------------------------------------------------------------------------------------- uploads
def test_a_job_upload_holds_only_the_allow_list(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    for name, text in {
        "shardyard/__init__.py": "",
        "shardyard/cluster/jobs.py": "x = 1",
        "pyproject.toml": "[project]",
        "jobs/a.yaml": "name: a",
        ".env": "WANDB_API_KEY=leak",
        ".netrc": "machine x password leak",
        "id_rsa": "-----BEGIN",
        "data/corpus.txt": "big",
        "runs/a/metrics.jsonl": "{}",
        ".git/config": "[core]",
        "shardyard/.secrets": "leak",
        "notes/keys.pem": "leak",
    }.items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(text)
    (checkout / "shardyard" / "__pycache__").mkdir()
    (checkout / "shardyard" / "__pycache__" / "jobs.cpython-311.pyc").write_bytes(b"\0")
    staged = stage_upload(checkout, tmp_path / "staged")
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == ["jobs/a.yaml", "pyproject.toml", "shardyard/__init__.py", "shardyard/cluster/jobs.py"]
    assert set(UPLOAD_ALLOW) == {"shardyard", "pyproject.toml", "jobs"}


# ------------------------------------------------------------------------------------- secrets
def test_secret_values_come_from_the_environment_and_never_enter_the_spec(tmp_path: Path) -> None:
    spec = load_spec_text(
        tiny_spec_yaml("s", tmp_path, env="{HF_HOME: /data/hf, API_TOKEN: {from_env: MY_TOKEN, secret: true}}")
    )
    plain, secret = worker_env(spec, {"MY_TOKEN": "tok-123", "WANDB_API_KEY": "wandb-456"})
    assert plain == {"HF_HOME": "/data/hf"} and secret == {"API_TOKEN": "tok-123", "WANDB_API_KEY": "wandb-456"}
    stored = spec_to_yaml(spec) + spec.model_dump_json()
    assert "tok-123" not in stored and "MY_TOKEN" in stored
    with pytest.raises(SpecError, match=r"env.API_TOKEN.from_env: \$MY_TOKEN is not set"):
        worker_env(spec, {})


def test_cluster_configs_never_serve_the_dashboard_on_all_interfaces() -> None:
    ray_up = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    head_commands = " ".join(ray_up["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_commands and "0.0.0.0" not in head_commands
    assert "RAY_LOGGER_LEVEL=warning" in head_commands and "RAY_LOGGER_LEVEL=warning" in " ".join(
        ray_up["worker_start_ray_commands"]
    )
    assert "file_mounts" not in ray_up or "~/.ray/auth_token" not in ray_up["file_mounts"]  # generated on the head
    assert ray_up["cluster_synced_files"] == ["~/.ray/auth_token"]
    rayjob = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert rayjob["spec"]["submissionMode"] == "SidecarMode"
    docs = (ROOT / "docs" / "ray-cluster.md").read_text()
    assert "ssh -N -L 8265:127.0.0.1:8265" in docs and "kubectl port-forward" in docs


def test_the_listener_summary_groups_by_reachability() -> None:
    text = describe(
        [
            Listener("dashboard", "127.0.0.1", 8265),
            Listener("gcs_server", "::", 6379),
            Listener("raylet", "0.0.0.0", 4000),
        ]
    )
    assert text.splitlines() == [
        "  listening on loopback: dashboard :8265",
        "  listening on all interfaces (Ray's gRPC servers; token required): gcs_server :6379, raylet :4000",
    ]


# ------------------------------------------------------------------------------------- a real run
@pytest.mark.ray
@pytest.mark.slow
def test_a_planted_secret_reaches_the_workers_and_nowhere_else(tmp_path: Path) -> None:
    """`shardyard run` of a tiny job with a marker secret (spec env) and a marker WANDB_API_KEY:
    each worker sees both (sha256 probe), and neither marker appears in stdout, stderr, any file of
    the run directory (spec, spec history, checkpoints, metrics, offline wandb), or the logs of the
    run's Ray session. Meanwhile the embedded cluster's sockets are read: the dashboard and the
    agents listen on loopback, and the printed summary names the real listeners."""
    secret, wandb_key = f"planted-secret-{os.getpid()}-7f3a", f"planted-wandb-{os.getpid()}-c41e"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "leak",
            tmp_path / "runs",
            env="{API_TOKEN: {from_env: PLANTED, secret: true}}",
            model="{kind: dense, width: 32, depth: 1, heads: 2, ffn: {hidden: 64}}",
            training="{steps: 2, batch_size: 2, eval_every: 0, eval_bytes: 512}",
            optim="{lr: 3.0e-3, schedule: {warmup: 1}}",
            data="{paths: [stdlib], seq_len: 32, max_bytes: 300000}",
            resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
            checkpoint=f"{{dir: {tmp_path / 'runs'}, every: 1, keep: 2}}",
        )
    )
    env = {
        **os.environ,
        "PLANTED": secret,
        "WANDB_API_KEY": wandb_key,
        "SHARDYARD_SECRET_PROBE": "API_TOKEN,WANDB_API_KEY",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [*SHARDYARD, "run", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        cwd=tmp_path,
    )
    seen: set[Listener] = set()
    session_dirs: set[str] = set()
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            seen |= set(listeners_of(tree))
            for pid in tree:
                session_dirs |= {
                    a.split("=", 1)[1] for a in psutil.Process(pid).cmdline() if a.startswith("--session-dir=")
                }
        except psutil.Error:
            pass
        time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    run_dir = tmp_path / "runs" / "leak"
    probe = (run_dir / "secret-probe-rank0.txt").read_text()
    assert f"API_TOKEN {hashlib.sha256(secret.encode()).hexdigest()}" in probe
    assert f"WANDB_API_KEY {hashlib.sha256(wandb_key.encode()).hexdigest()}" in probe
    places = [("stdout", out.encode()), ("stderr", err.encode())]
    places += [(str(p), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in name for name, _ in places) and any("spec-history" in name for name, _ in places)
    assert session_dirs, "the run's Ray session was not found"
    for session in session_dirs:
        places += [(str(p), p.read_bytes()) for p in Path(session, "logs").rglob("*") if p.is_file()]
    for marker in (secret, wandb_key):
        leaks = [name for name, data in places if marker.encode() in data]
        assert leaks == [], f"{marker} found in {leaks}"

    dashboard = [item for item in seen if item.process == "dashboard"]
    # its HTTP server (dashboard, Jobs API, state API) on loopback; its gRPC port is one of Ray 2.60's
    # servers that listen on all interfaces and require the token (docs/security.md)
    assert any(item.scope == "loopback" for item in dashboard), dashboard
    assert all(item.scope == "loopback" for item in seen if item.process in ("dashboard agent", "runtime env agent"))
    gcs = [item for item in seen if item.process == "gcs_server"]
    assert gcs and all(f"gcs_server :{item.port}" in out for item in gcs)  # the message names the real sockets
