"""Graceful stop and time-based checkpoints: decided together by all ranks at a step boundary.

A stop request is a file in the run directory (`STOP`): the driver writes it when it gets SIGTERM or
SIGINT, `shardyard stop RUN` writes it from another terminal; a rank's own `signalled` flag (set by
whoever runs the loop) counts too. Ranks see the file at different moments, so every step
ends with one tiny all_reduce (MAX over [stop, checkpoint due]): either every rank stops after the
same step, having written the same checkpoint, or none does. The same reduction carries the
time-based checkpoint interval (`checkpoint.every_minutes`): the clocks of the ranks differ, their
maximum does not.

A planned resize of an elastic group rides on the same agreement: the controller's scaling policy
(runtime/elastic.py) writes `RESIZE` instead of restarting the group at once; the ranks agree on a
step boundary, checkpoint there, rank 0 writes `RESIZE_READY` with that step, and every rank holds
(beating the watchdog) until the controller restarts the group at its new size from that checkpoint.
So growing redoes no step.

The driver side (`graceful_stop`) turns the first SIGTERM/SIGINT into a stop request and the second
into an immediate abort (KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardyard import envvars
from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import JobSpec
from shardyard.runtime.run_events import append_event, request_stop, stop_reason
from shardyard.runtime.watchdog import beat

HANG_MARKER = ".injected_hang_done"
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command again to continue


@dataclass(frozen=True)
class BoundaryDecision:
    stop: bool
    checkpoint: bool
    hold: bool = False  # a planned resize: checkpoint, then wait for the controller to restart the group


class StepBoundary:
    """Every rank calls `agree(step)` after each optimizer step (collective, 2 floats)."""

    def __init__(self, spec: JobSpec, run_dir: Path, rank: int, world: int, device: torch.device) -> None:
        self.run_dir, self.rank, self.world, self.device = run_dir, rank, world, device
        minutes = spec.checkpoint.every_minutes
        self.interval_s = None if minutes is None else minutes * 60.0
        self.last_save = time.monotonic()
        self.signalled = threading.Event()
        self._hang = _hang_hook(rank)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def agree(self, step: int) -> BoundaryDecision:
        local_stop = self.signalled.is_set() or RunDir(self.run_dir).stop_request.exists()
        due = self.interval_s is not None and time.monotonic() - self.last_save >= self.interval_s
        resize = RunDir(self.run_dir).resize_request.exists()
        flags = torch.tensor([float(local_stop), float(due), float(resize)], device=self.device)
        if self._hang is not None and step == self._hang[0]:
            self._sleep_once(step)
        beat(step, "step-boundary all_reduce")
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        beat(step + 1, "training")
        stop, due, resize = (bool(v) for v in flags.tolist())
        return BoundaryDecision(stop=stop, checkpoint=due, hold=resize and not stop)

    def hold_for_resize(self, step: int, limit_s: float) -> None:
        """After the resize checkpoint of `step`: say so (rank 0) and wait to be restarted at the new size.
        Raises when no restart comes within `limit_s` (the attempt then restarts from that checkpoint)."""
        if self.rank == 0:
            ready = RunDir(self.run_dir).resize_ready
            tmp = self.run_dir / f".{ready.name}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"step": step, "time": time.time()}))
            os.replace(tmp, ready)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            beat(step, "holding for a resize")
            time.sleep(0.2)
        raise RuntimeError(f"a resize was requested at step {step} but the group was not restarted in {limit_s:.0f} s")

    def _sleep_once(self, step: int) -> None:
        """Test hook ($SHARDYARD_HANG_AT="<step>:<rank>"): this rank never joins the step's
        all_reduce (once per run), so its peers wait inside the collective."""
        marker = self.run_dir / HANG_MARKER
        if marker.exists():
            return
        marker.write_text(f"{step}:{self.rank}")
        time.sleep(self._hang[1])

    def announce_stop(self, step: int) -> None:
        if self.rank == 0:
            append_event(
                self.run_dir,
                {"event": "stopped", "step": step, "reason": stop_reason(self.run_dir) or "a rank's stop flag"},
            )
            print(
                f"[shardyard] stopped at step {step} with a checkpoint ({stop_reason(self.run_dir) or 'SIGTERM'})",
                flush=True,
            )


def _hang_hook(rank: int) -> tuple[int, float] | None:
    value = os.environ.get(envvars.HANG_AT)
    if not value:
        return None
    parts = value.split(":")
    if int(parts[1]) != rank:
        return None
    return int(parts[0]), float(parts[2]) if len(parts) > 2 else 3600.0


# ------------------------------------------------------------------------------ driver side
@contextlib.contextmanager
def graceful_stop(
    run_dir: Path, announce=lambda message: print(message, file=sys.stderr, flush=True)
) -> Iterator[None]:
    """While training runs in this (main) thread: the first SIGTERM or SIGINT asks the workers to
    checkpoint and stop at the next step boundary; a second one aborts at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            request_stop(run_dir, f"{name} to the driver")
            announce(
                f"[shardyard] {name}: checkpointing and stopping at the next step boundary "
                f"(send it again to abort without a checkpoint)"
            )
        else:
            raise KeyboardInterrupt(f"second {name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def checkpoint_warning(spec: JobSpec) -> str | None:
    """A warning when a fault before the end would lose the whole run: no checkpoint before the last step."""
    every, steps = spec.checkpoint.every, spec.training.steps
    if spec.checkpoint.every_minutes is not None:
        return None
    if every == 0 or every >= steps:
        return (
            f"warning: no checkpoint before the end (checkpoint.every {every}, training.steps {steps}): a fault or "
            f"preemption restarts from step 0; set checkpoint.every below {steps} or checkpoint.every_minutes"
        )
    return None
