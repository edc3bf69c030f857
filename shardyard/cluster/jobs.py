"""Ray Jobs: submit a job spec to a cluster, and ask about / stop / follow submitted jobs.

The project's code travels as the job's working_dir, staged from an allow-list (the package,
pyproject.toml, jobs/); the resolved spec and the spec's `env` travel as environment variables.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from shardyard import envvars
from shardyard.cluster.auth import ensure_token
from shardyard.platform.errors import ClusterError
from shardyard.platform.schema import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
UPLOAD_ALLOW = ("shardyard", "pyproject.toml", "jobs")  # what a submitted job's working_dir holds


def resolve_address(address: str | None) -> str:
    address = (
        address
        or os.environ.get(envvars.ADDRESS)
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    if "://" not in address:
        host = address.split(":")[0]
        address = f"http://{host}:8265" if address.endswith(":6379") else f"http://{address}"
    return address


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    try:
        ensure_token(generate=False)
    except FileNotFoundError as err:
        raise ClusterError(str(err)) from None
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # connection refused, auth failure, ...
        raise ClusterError(
            f"cannot reach the Ray cluster at {url}: {err}\n  start one with `shardyard cluster up`, or pass --address"
        ) from None


def project_root() -> Path | None:
    """The checkout this package runs from, shipped as working_dir; None when installed site-wide."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() and (root / "shardyard").is_dir() else None


def stage_upload(root: Path, staging: Path) -> Path:
    """Copy only UPLOAD_ALLOW (the package, pyproject.toml, jobs/) of the checkout at `root` into
    `staging`, without caches, and return it: the job's working_dir. An allow-list, not excludes,
    so `.env`, `.netrc`, keys, data and runs in the checkout never travel."""
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for name in UPLOAD_ALLOW:
        source = root / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, staging / name, ignore=junk, symlinks=False)
        elif source.is_file() and not source.is_symlink():
            shutil.copy2(source, staging / name)
    return staging


def submit(spec: JobSpec, run_dir: Path, address: str | None = None) -> str:
    """Submit `spec` as a Ray job; this process's SHARDYARD_* variables (test hooks) travel with it,
    and the spec's `env` (secrets included) in the job's runtime env only."""
    from shardyard.cluster.secret_env import runtime_env_vars

    job_client = client(address)
    env = {
        **envvars.forwarded(),
        **runtime_env_vars(spec),
        envvars.SPEC_JSON: spec.model_dump_json(),
        envvars.RUN_DIR: str(run_dir),
        "RAY_AUTH_MODE": "token",
        "WANDB_MODE": spec.tracking.mode,
        # `stop` sends SIGTERM, then SIGKILL after this long: time for one step and a checkpoint
        "RAY_JOB_STOP_WAIT_TIME_S": str(stop_grace_s(spec)),
    }
    runtime_env: dict = {"env_vars": env}
    submission_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="shardyard-upload-") as staging:
        if root is not None:
            runtime_env["working_dir"] = str(stage_upload(root, Path(staging)))
        try:  # the working_dir is packed and uploaded before submit_job returns
            return job_client.submit_job(
                entrypoint="python -m shardyard.cli.job_entry",
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"shardyard_job": spec.name},
            )
        except Exception as err:
            raise ClusterError(f"job submission failed: {_without(str(err), env)}") from None


def _without(text: str, env: dict[str, str]) -> str:
    """`text` with every value of `env` longer than 3 characters masked (an error may echo the request)."""
    for value in sorted({v for v in env.values() if len(v) > 3}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def stop_grace_s(spec: JobSpec) -> int:
    """Seconds between a stop's SIGTERM and Ray Jobs' SIGKILL: a step plus a checkpoint must fit."""
    return int(spec.resources.collective_timeout_minutes * 60) + 120


def status(job_id: str, address: str | None = None) -> tuple[str, str | None]:
    info = _info(job_id, address)
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message


def _info(job_id: str, address: str | None):
    job_client = client(address)
    try:
        return job_client.get_job_info(job_id)
    except Exception as err:
        raise ClusterError(f"no job {job_id!r} on the cluster: {err}") from None


def logs(job_id: str, address: str | None = None) -> str:
    _info(job_id, address)
    return client(address).get_job_logs(job_id)


def follow_logs(job_id: str, address: str | None = None) -> Iterator[str]:
    """Yield new log text until the job ends (polling; no websocket needed)."""
    job_client = client(address)
    _info(job_id, address)
    seen = 0
    while True:
        text = job_client.get_job_logs(job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        state = str(job_client.get_job_status(job_id).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            text = job_client.get_job_logs(job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(1.0)


def stop(job_id: str, address: str | None = None) -> bool:
    _info(job_id, address)
    return client(address).stop_job(job_id)


def list_jobs(address: str | None = None) -> list[dict]:
    rows = []
    for info in client(address).list_jobs():
        rows.append(
            {
                "id": info.submission_id or info.job_id,
                "status": str(info.status.value),
                "name": (info.metadata or {}).get("shardyard_job", ""),
                "start": info.start_time,
                "end": info.end_time,
            }
        )
    return sorted(rows, key=lambda r: r["start"] or 0)


def wait(job_id: str, address: str | None = None, timeout_s: float = 600) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state, _ = status(job_id, address)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(1.0)
    raise ClusterError(f"job {job_id} still running after {timeout_s:.0f} s")
