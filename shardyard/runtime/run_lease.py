"""One run directory, one writer: a lease file held by the driver of the job that trains the run.

`<run_dir>/.lease` holds {pid, host, owner, started, heartbeat}. It is created with O_EXCL; while
its holder lives, another job for the same run directory (a second `shardyard run` or `submit`
with the same name and storage) is refused with a message naming the holder. A lease is stale,
and taken over, when its holder is a process of this host that no longer exists, or when its
heartbeat (renewed every `HEARTBEAT_S` by a daemon thread) is older than `STALE_AFTER_S` (a
holder on another host that died). Takeover renames the stale file away first, so of two jobs
that find the same stale lease only one wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir

HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0


class RunBusy(UserError):
    """Another live job holds this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lease(run_dir: Path) -> dict[str, Any] | None:
    return _read(RunDir(Path(run_dir)).lease)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # torn or garbage: treated as stale


def stale_reason(lease: dict[str, Any], now: float | None = None) -> str | None:
    """Why `lease` no longer protects its run (None while its holder is alive)."""
    now = time.time() if now is None else now
    if not lease or not isinstance(lease.get("pid"), int) or not isinstance(lease.get("heartbeat"), (int, float)):
        return "the lease file is unreadable"
    if lease.get("host") == socket.gethostname() and not _pid_alive(lease["pid"]):
        return f"process {lease['pid']} on {lease['host']} has exited"
    age = now - float(lease["heartbeat"])
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return None


class Lease:
    """A held lease; `release()` (or leaving `hold_lease`) removes it if it is still ours."""

    def __init__(self, run_dir: Path, record: dict[str, Any]) -> None:
        self.path = RunDir(Path(run_dir)).lease
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="shardyard-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        tmp = self._tmp()
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)

    def _tmp(self) -> Path:
        return self.path.with_name(f"{self.path.name}.{self.record['owner']}.tmp")

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT_S):
            current = read_lease(self.path.parent)
            if not current or current.get("owner") != self.record["owner"]:
                return  # taken over (we were presumed dead): never write over the new holder
            self.record["heartbeat"] = time.time()
            try:
                self._write()
            except OSError as err:  # a full disk: the old heartbeat stays; say so once, keep trying
                if not failing:
                    print(
                        f"[shardyard] warning: cannot renew the run's lease {self.path} ({err.strerror or err}); "
                        "retrying every beat",
                        flush=True,
                    )
                failing = True
                self._tmp().unlink(missing_ok=True)
            else:
                failing = False

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        current = read_lease(self.path.parent)
        if current and current.get("owner") == self.record["owner"]:
            self.path.unlink(missing_ok=True)


class DriverWatch:
    """A worker's view of the driver that holds the run's lease: when that driver ran on this host
    and its process is gone (a SIGKILL, an OOM kill, a closed laptop), the worker ends at once, before
    it writes anything more into the run. A holder on another host is left to its cluster (the
    embedded cluster's watcher, or Ray Jobs); a run without a lease (tools, tests) is not watched."""

    def __init__(self, run_dir: Path) -> None:
        lease = read_lease(run_dir)
        here = bool(lease) and lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int)
        self.pid: int | None = lease["pid"] if here and lease else None

    def exit_if_gone(self, step: int) -> None:
        if self.pid is not None and not _pid_alive(self.pid):
            print(f"[shardyard] the driver (pid {self.pid}) is gone: this worker stops at step {step}", flush=True)
            os._exit(EXIT_DRIVER_GONE)


EXIT_DRIVER_GONE = 79


def acquire(run_dir: Path, report=print) -> Lease:
    """Take the run's lease or raise RunBusy naming its live holder; a stale lease is taken over
    (`report` hears why)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lease
    now = time.time()
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "owner": uuid.uuid4().hex,
        "started": now,
        "heartbeat": now,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lease(run_dir)
            if holder is None:
                continue  # released meanwhile
            reason = stale_reason(holder)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise RunBusy(
                    f"{run_dir} is in use by another job (pid {holder['pid']} on {holder['host']}, "
                    f"started {started}); wait for it, stop it, or give this job another name "
                    "(--set name=...)"
                ) from None
            aside = path.with_name(f"{path.name}.stale-{record['owner']}")
            try:
                os.rename(path, aside)  # only one contender can move the stale file away
            except FileNotFoundError:
                continue
            moved = _read(aside)
            if moved and holder and moved.get("owner") != holder.get("owner"):
                os.rename(aside, path)  # a contender's fresh lease, not the stale one: give it back
                continue
            aside.unlink(missing_ok=True)
            report(f"[shardyard] taking over the lease of {run_dir}: {reason}")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return Lease(run_dir, record)
    raise RunBusy(f"{run_dir}: could not take the run's lease (other jobs keep starting on it)")


@contextlib.contextmanager
def hold_lease(run_dir: Path) -> Iterator[Lease]:
    lease = acquire(run_dir)
    try:
        yield lease
    finally:
        lease.release()
