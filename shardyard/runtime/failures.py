"""What happens when an attempt fails, and what the user sees of it (the controller's policy itself:
runtime/failure_policy.py).

- `route_worker_output` (driver): everything the workers and the controller print goes to
  `<run_dir>/driver.log`; the console gets only lines meant for the user (`[shardyard] ...`) and
  one line per event (`EventPrinter`), instead of pages of controller tracebacks.
- `ShardyardTorchTrainer`: a TorchTrainer that uses that policy and leaves SIGINT to shardyard
  (`preemption.graceful_stop`) instead of aborting the run without a checkpoint.

Ray Train 2.60 has no public hook for either (FailureConfig only counts failures; the policy is
built inside `fit()`), so the trainer overrides `_initialize_and_run_controller` to pass its own.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ray.train.v2.api.exceptions import TrainingFailedError

from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import JobSpec
from shardyard.runtime.devices import worker_device
from shardyard.runtime.failure_policy import ShardyardFailurePolicy, as_user_error, first_line, summarise
from shardyard.runtime.run_events import read_events
from shardyard.runtime.watchdog import StepWatchdog, read_heartbeats


def event_line(event: dict[str, Any]) -> str | None:
    """The console line for one event record."""
    kind = event.get("event")
    if kind == "retry":
        start = event.get("restart_step")
        where = f"the checkpoint at step {start}" if start is not None else "step 0 (no checkpoint yet)"
        return (
            f"[shardyard] fault: {event['message']}; restarting from {where} (failures left: {event['failures_left']})"
        )
    if kind == "fail":
        if event.get("user_error"):
            return f"[shardyard] error (not retried): {event['message']}"
        return f"[shardyard] fault: {event['message']}; no failures left (resources.max_failures), the job fails"
    if kind == "resize_request":
        return (
            f"[shardyard] room for {event['to']} workers: checkpointing at the next step boundary, then "
            f"workers {event['from']} -> {event['to']}"
        )
    return None  # "stopped" and "resize" are announced by the workers and the summary


# ------------------------------------------------------------------------------ the driver's console
class DriverLog:
    """`<run_dir>/driver.log`, appended line by line; a write that fails (a full disk, a lost mount)
    loses that detail and says so once on the console instead of ending the driver with a traceback."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).driver_log
        self.warned = False

    def write(self, text: str) -> None:
        try:
            with open(self.path, "a") as log:
                log.write(text)
        except OSError as err:
            if not self.warned:
                self.warned = True
                print(
                    f"[shardyard] warning: cannot write {self.path} ({err.strerror or err}); its detail is lost "
                    "until the disk has room",
                    flush=True,
                )


class EventPrinter:
    """Tails `<run_dir>/events.jsonl` (from where it was at start) and prints each event as one line;
    writes the full detail to driver.log."""

    def __init__(self, run_dir: Path, out: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
        self.run_dir, self.out = run_dir, out
        _, self.offset = read_events(run_dir, 0)
        self.events: list[dict[str, Any]] = []
        self.log = DriverLog(run_dir)

    def poll(self) -> None:
        events, self.offset = read_events(self.run_dir, self.offset)
        for event in events:
            self.events.append(event)
            line = event_line(event)
            if line:
                self.out(line)
                with open(RunDir(self.run_dir).driver_log, "a") as log:
                    log.write(line + "\n")
            if event.get("detail"):
                self.log.write(
                    f"--- {event.get('event')} at {time.strftime('%H:%M:%S')}: {event.get('message')}\n"
                    f"{event['detail']}\n"
                )


def route_worker_output(run_dir: Path) -> Callable[[], None]:
    """Send the streamed output of Ray workers and the controller to `<run_dir>/driver.log`; pass only
    `[shardyard]` lines on to the console. Returns a function that restores Ray's own printing."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    log = DriverLog(run_dir)
    lock = threading.Lock()
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    original = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)

    recent: dict[tuple[Any, str], float] = {}

    def handle(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        source = data.get("actor_name") or data.get("task_name") or "worker"
        now = time.time()
        keep = []
        with lock:
            log.write("".join(f"({source} pid={data.get('pid')}) {line}\n" for line in lines))
            for line in lines:
                key = (data.get("pid"), line)
                # Ray Train streams a worker's stdout twice (its log file and the job's): print once.
                if line.lstrip().startswith("[shardyard]") and now - recent.get(key, 0.0) > 5.0:
                    keep.append(line)
                    recent[key] = now
        if keep:
            original({**data, "lines": keep})

    print_any = ray_worker.print_to_stdstream

    def print_errors(data: dict[str, Any], ignore_prefix: bool) -> None:
        """Ray's error listener prints raylet notices (a node marked dead, a worker killed) through
        this module function: they go to driver.log; the fault's event line says it once."""
        if data.get("pid") == "raylet":
            with lock:
                log.write("".join(f"(raylet) {line}\n" for line in data.get("lines") or []))
            return
        print_any(data, ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("shardyard_print_logs", handle)
    ray_worker.print_to_stdstream = print_errors

    def restore() -> None:
        ray_worker.print_to_stdstream = print_any
        dispatcher.remove_handler("shardyard_print_logs")
        dispatcher.add_handler("ray_print_logs", original)

    return restore


def _last_attempt_start(run_dir: Path) -> float:
    beats = read_heartbeats(RunDir(run_dir).heartbeats)
    return max((b.get("attempt", 0.0) for b in beats.values()), default=0.0)


def build_torch_trainer(
    run_dir: Path, timeout_s: float, scaling_policy: Callable[[Any], Any] | None = None, **kwargs: Any
):
    """A TorchTrainer (same arguments) that fails fast on user errors, records failure events in
    `run_dir`, does not take over SIGINT and starts no Ray Data process it would not use;
    `scaling_policy(scaling_config)`, when given, replaces Ray's own (elastic groups: runtime/elastic.py)."""
    from ray.train.torch import TorchTrainer

    class ShardyardTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_kwargs: Any):
            controller_kwargs["failure_policy"] = ShardyardFailurePolicy(
                self.run_config.failure_config, str(run_dir), timeout_s
            )
            if scaling_policy is not None:
                controller_kwargs["scaling_policy"] = scaling_policy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_kwargs)

        def _register_sigint_handler(self, controller: Any) -> None:
            pass  # preemption.graceful_stop owns SIGINT/SIGTERM: checkpoint first, then stop

        def _create_default_callbacks(self) -> list[Any]:
            # Ray Train starts a DatasetManager actor (one more process, importing Ray Data) for every
            # worker group, datasets or not; shardyard's workers read their own data
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return ShardyardTorchTrainer(**kwargs)


def failure_summary(error: BaseException, run_dir: Path, timeout_s: float = 300.0) -> str:
    """The one-line error of a failed `fit()`; the full text goes to driver.log."""
    DriverLog(run_dir).write(f"--- fit() failed: {type(error).__name__}\n{error}\n")
    if isinstance(error, TrainingFailedError):
        line, _ = summarise(error, run_dir, _last_attempt_start(run_dir), timeout_s)
        return f"{line} (details in {RunDir(run_dir).driver_log})"
    return f"{type(error).__name__}: {first_line(str(error))} (details in {RunDir(run_dir).driver_log})"


@contextlib.contextmanager
def worker_attempt(spec: JobSpec, run_dir: Path) -> Iterator[None]:
    """Around one worker's attempt: the step watchdog runs, and an error that is the user's to fix
    (a model that does not fit) leaves as a UserError, which the policy does not retry."""
    rank, world = dist.get_rank(), dist.get_world_size()  # Ray Train's process group, made before the loop
    attempt = torch.tensor([time.time()], dtype=torch.float64, device=worker_device())
    if world > 1:
        dist.broadcast(attempt, 0)  # one id for this attempt's heartbeats on every rank
    with StepWatchdog(run_dir, rank, world, spec.resources.collective_timeout_minutes * 60, attempt=attempt.item()):
        try:
            yield
        except Exception as err:
            user = as_user_error(err)
            if user is not None and user is not err:
                raise user from err
            raise
