"""`shardyard cluster up|down`: a local Ray head with token authentication (ray start / ray stop)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from shardyard.cluster.auth import ensure_token
from shardyard.cluster.listening import describe, listeners_of
from shardyard.platform.errors import ClusterError


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def cluster_up(
    num_cpus: int | None = None,
    port: int = 6379,
    dashboard_port: int = 8265,
    object_store_mb: int = 512,
    client_port: int = 10001,
) -> str:
    """Start a head whose node address, dashboard, Jobs API and client server are on loopback; the
    message lists every listening socket of the head's processes (Ray's gRPC servers listen on all
    interfaces in Ray 2.60 and require the token)."""
    token = ensure_token(generate=True)
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        "--disable-usage-stats",
        f"--object-store-memory={object_store_mb * 1024**2}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # RAY_LOGGER_LEVEL=warning: Ray's runtime env agent logs env_vars (secrets included) at INFO.
    env = {"RAY_LOGGER_LEVEL": "warning", **os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"`ray start --head` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return (
        f"Ray head running: GCS 127.0.0.1:{port}, Jobs API and dashboard http://127.0.0.1:{dashboard_port}, "
        f"client server ray://127.0.0.1:{client_port}\n"
        f"token authentication on; token file: {token or '$RAY_AUTH_TOKEN'}\n"
        f"{describe(_head_listeners(port))}\n"
        "from another machine, reach the dashboard through an SSH tunnel: ssh -L "
        f"{dashboard_port}:127.0.0.1:{dashboard_port} <this host>"
    )


def _head_listeners(gcs_port: int, wait_s: float = 15.0) -> list:
    """The head's listening sockets, once its dashboard listens (`ray start` returns before every
    daemon has bound its ports), or whatever listens after `wait_s`."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = listeners_of(head_processes(gcs_port))
        if any(item.process == "dashboard" for item in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def head_processes(gcs_port: int) -> list[int]:
    """The head's daemons (`ray start` detaches them): processes naming its GCS address or port."""
    import psutil

    marks = (f":{gcs_port}", f"--gcs_server_port={gcs_port}", f"--gcs-port={gcs_port}", f"--port={gcs_port}")
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(mark in part for part in process.info["cmdline"] or [] for mark in marks):
                pids.append(process.info["pid"])
        except psutil.Error:
            continue
    return pids


def cluster_down(port: int = 6379, grace_s: float = 10.0) -> str:
    """Stop the head `cluster up` started on GCS `port`, and only it: `ray stop` would kill every Ray
    process on the machine (other users' clusters, embedded test clusters). SIGTERM, then SIGKILL
    whatever is left after `grace_s`."""
    import psutil

    processes = []
    for pid in head_processes(port):
        try:
            processes.append(psutil.Process(pid))
        except psutil.Error:
            continue
    if not processes:
        return f"no Ray head on port {port}: nothing stopped"
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return f"Ray head on port {port} stopped ({len(processes)} processes)"
