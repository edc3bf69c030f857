"""The run directory's control files: how the driver, `shardyard stop`, the Ray Train controller and
the workers tell each other things without a connection. Plain files, written atomically; nothing
here imports torch, so the controller (which reads and writes them) starts light.

- `STOP`: a stop request (the driver on SIGTERM/SIGINT, `shardyard stop`); ranks agree on it at a step
  boundary (runtime/preemption.py).
- `events.jsonl`: one JSON line per event (stop, fault, retry, resize) the driver prints as one line.
- `RESIZE` / `RESIZE_READY`: the elastic controller asks the running group for a checkpoint at an
  agreed step (runtime/elastic.py); rank 0 answers with that step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from shardyard.platform.run_dir import RunDir


# ------------------------------------------------------------------------------ the stop request
def request_stop(run_dir: Path, reason: str) -> Path:
    """Ask a running job to checkpoint and exit at its next step boundary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    flag = RunDir(run_dir).stop_request
    tmp = flag.with_name(f".{flag.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"reason": reason, "time": time.time()}))
    os.replace(tmp, flag)
    return flag


def clear_stop(run_dir: Path) -> None:
    """A new attempt of the run starts: an old request is done with."""
    with contextlib.suppress(FileNotFoundError):
        RunDir(run_dir).stop_request.unlink()


def stop_reason(run_dir: Path) -> str | None:
    try:
        return str(json.loads(RunDir(run_dir).stop_request.read_text()).get("reason", "stop requested"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "stop requested"


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """One JSON line per event (stop, fault, restart) the driver turns into one line for the user."""
    with open(RunDir(run_dir).events, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_events(run_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete event records after byte `offset`, and the offset after them."""
    path = RunDir(run_dir).events
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    events = []
    for line in complete.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events, offset + len(complete)


# ------------------------------------------------------------------------------ resize
def request_resize(run_dir: Path, workers: int) -> None:
    """Controller side: checkpoint at the next agreed step boundary, then hold for a resize to `workers`."""
    request = RunDir(run_dir).resize_request
    tmp = run_dir / f".{request.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"workers": workers, "time": time.time()}))
    os.replace(tmp, request)


def resize_ready_step(run_dir: Path) -> int | None:
    """The step whose checkpoint the held group wrote for the requested resize (None: not yet)."""
    try:
        return int(json.loads(RunDir(run_dir).resize_ready.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def clear_resize(run_dir: Path) -> None:
    for path in (RunDir(run_dir).resize_request, RunDir(run_dir).resize_ready):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
