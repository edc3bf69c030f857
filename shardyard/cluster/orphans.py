"""The embedded cluster never outlives its driver.

Ray ties only its direct children (GCS, raylet) to the driver, through PR_SET_PDEATHSIG; the raylet's
agents (DashboardAgent, RuntimeEnvAgent) and the training workers live on when the driver is killed
with SIGKILL. So `local_cluster` marks the cluster: `SHARDYARD_CLUSTER_ID=<uuid>` in the driver's
environment before `ray.init`, which every process of that Ray session inherits (GCS, raylet, agents,
workers), and starts this watcher as a detached process of its own session:

    python -m shardyard.cluster.orphans <driver pid> <driver start time> <cluster id>

It polls the driver every `POLL_S`; once the driver is gone (or another process took its pid) it
SIGKILLs every process whose environment carries the cluster id, until none is left, then exits.
A driver that ends normally shuts Ray down and stops the watcher itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shardyard import envvars

POLL_S = 0.5


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None when
    it is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def marked_processes(cluster_id: str) -> list[int]:
    """Pids of the processes (this one excepted) whose environment carries the cluster id."""
    marker = f"{envvars.CLUSTER_ID}={cluster_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def end_cluster(cluster_id: str, rounds: int = 20) -> int:
    """SIGKILL every marked process, again until none is left (a dying raylet may start a worker)."""
    killed = 0
    for _ in range(rounds):
        pids = marked_processes(cluster_id)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return killed


def watch(driver_pid: int, driver_started: str, cluster_id: str) -> None:
    while start_time(driver_pid) == driver_started:
        time.sleep(POLL_S)
    end_cluster(cluster_id)


def start_watcher(cluster_id: str) -> subprocess.Popen:
    """The watcher of this process (the driver), detached: its own session, no terminal, no pipes."""
    me = os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "shardyard.cluster.orphans", str(me), str(start_time(me)), cluster_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != envvars.CLUSTER_ID},  # never a target itself
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
