"""Step watchdog: no rank waits forever, and the report names the rank that stopped.

The training loop marks progress with `beat(step, phase)` (an in-memory update, no I/O on the
training path). A daemon thread per rank writes that state to `<run_dir>/heartbeats/rank<r>.json`
every few seconds. When its own rank has made no progress for `timeout_s`, the thread reads every
rank's heartbeat, writes a stall report naming the rank that stopped first (oldest progress, lowest
step), prints it and ends this process: the attempt ends, and the job restarts or fails by its
failure policy instead of hanging. The process-group timeout (`resources.collective_timeout_minutes`,
given to Ray Train's TorchConfig) ends a rank blocked inside gloo/NCCL the same way; the watchdog
also catches a rank stuck outside any collective (a deadlocked loader, a hung filesystem).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shardyard.platform.run_dir import RunDir

STALL_PREFIX = "stall-rank"
EXIT_STALLED = 86
STARTUP_LIMIT_S = 1200.0
# The phases of one step in the order a rank passes them: among ranks at the same step, the one in
# an earlier phase is behind (clocks and scheduling make progress times alone unreliable).
PHASE_ORDER = {
    "start-up": -1,
    "training": 0,
    "step-boundary all_reduce": 1,
    "evaluation": 2,
    "checkpoint": 3,
    "holding for a resize": 4,
}

_current: StepWatchdog | None = None


def beat(step: int, phase: str) -> None:
    """Progress: this rank reached `phase` of `step`. A no-op when no watchdog runs (tests)."""
    if _current is not None:
        _current.mark(step, phase)


class StepWatchdog:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world: int,
        timeout_s: float,
        attempt: float | None = None,
        period_s: float | None = None,
        exit_on_stall: bool = True,
    ) -> None:
        """`attempt`: an id every rank of this attempt shares (rank 0's start time, broadcast), so a
        report never mixes in a heartbeat left by an earlier attempt."""
        self.directory = RunDir(run_dir).heartbeats
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.period_s = period_s if period_s is not None else max(0.2, min(5.0, timeout_s / 4))
        self.exit_on_stall = exit_on_stall
        self.step, self.phase = 0, "start-up"
        self.progress_time = time.time()
        self.started = time.time()
        self.attempt = attempt if attempt is not None else self.started
        self.stall_report: dict[str, Any] | None = None
        self.node_id = _ray_node_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardyard-watchdog", daemon=True)

    def mark(self, step: int, phase: str) -> None:
        self.step, self.phase, self.progress_time = step, phase, time.time()

    def start(self) -> StepWatchdog:
        global _current
        for old in self.directory.glob(f"{STALL_PREFIX}{self.rank}.json"):
            old.unlink(missing_ok=True)  # a report of an earlier attempt
        _current = self
        self._write_heartbeat()
        self._thread.start()
        return self

    def stop(self) -> None:
        global _current
        self._stop.set()
        if _current is self:
            _current = None

    def __enter__(self) -> StepWatchdog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- thread
    def _heartbeat(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "step": self.step,
            "phase": self.phase,
            "progress_time": self.progress_time,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": self.node_id,
            "attempt": self.attempt,
        }

    def _write_heartbeat(self) -> None:
        path = self.directory / f"rank{self.rank}.json"
        tmp = self.directory / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(self._heartbeat()))
        os.replace(tmp, path)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._write_heartbeat()
            except OSError:
                pass  # a full or vanished run directory must not kill training; the stall check still runs
            idle = time.time() - self.progress_time
            # Start-up (corpus cache, model build, the first collectives) may legitimately take longer.
            limit = self.timeout_s if self.phase != "start-up" else max(4 * self.timeout_s, STARTUP_LIMIT_S)
            if idle >= limit:
                self._stalled(idle)
                return

    def _stalled(self, idle: float) -> None:
        report = stall_report(self.directory, self.rank, self.world, self.timeout_s, attempt=self.attempt)
        self.stall_report = report
        try:
            (self.directory / f"{STALL_PREFIX}{self.rank}.json").write_text(json.dumps(report))
        except OSError:
            pass
        print(
            f"[shardyard] watchdog on rank {self.rank}: {report['message']}; ending this attempt",
            file=sys.stderr,
            flush=True,
        )
        if self.exit_on_stall:
            os._exit(EXIT_STALLED)


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which node a stalled or dead rank was on."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def read_heartbeats(directory: Path, since: float = 0.0, attempt: float | None = None) -> dict[int, dict[str, Any]]:
    """rank -> heartbeat, of attempt `attempt`, or else of the newest attempt that began after `since`."""
    records = []
    for path in directory.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if attempt is None:
        attempt = max((r.get("attempt", 0.0) for r in records if r.get("attempt", 0.0) >= since), default=None)
    return {int(r["rank"]): r for r in records if attempt is not None and r.get("attempt") == attempt}


def stall_report(
    directory: Path, reporter: int, world: int, timeout_s: float, since: float = 0.0, attempt: float | None = None
) -> dict[str, Any]:
    """Which rank stopped progressing: the one with the lowest step, then the earliest phase, then the
    oldest progress; ranks
    without any heartbeat of this attempt count as stopped before their first step."""
    beats = read_heartbeats(directory, since, attempt)
    now = time.time()
    missing = [r for r in range(world) if r not in beats]
    if missing:
        stuck = missing[0]
        where = "before its first step (no heartbeat)"
    else:
        stuck = min(
            beats, key=lambda r: (beats[r]["step"], PHASE_ORDER.get(beats[r]["phase"], -1), beats[r]["progress_time"])
        )
        b = beats[stuck]
        where = f"at step {b['step']} ({b['phase']}), pid {b['pid']} on {b['host']}"
    others = ", ".join(f"rank {r} at step {b['step']} ({b['phase']})" for r, b in sorted(beats.items()) if r != stuck)
    idle = now - beats[stuck]["progress_time"] if stuck in beats else now - since
    message = (
        f"rank {stuck} stopped progressing {where}: no progress for {idle:.0f} s "
        f"(limit {timeout_s:.0f} s, resources.collective_timeout_minutes)"
    )
    if others:
        message += f"; {others}"
    return {
        "stuck_rank": stuck,
        "reporter": reporter,
        "message": message,
        "time": now,
        "heartbeats": {str(r): b for r, b in beats.items()},
    }


def read_stall_reports(run_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Stall reports written by watchdogs since `since` (any rank)."""
    out = []
    for path in RunDir(run_dir).heartbeats.glob(f"{STALL_PREFIX}*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if report.get("time", 0) >= since:
            out.append(report)
    return sorted(out, key=lambda r: r["time"])
