"""What happens when an attempt fails, and what the user sees of it.

- `ShardyardFailurePolicy` (runs in the Ray Train controller): a `UserError` raised on any worker
  (bad data path, corpus too small, a model that cannot fit) fails the job at once instead of being
  retried; everything else follows `resources.max_failures` (-1 = unlimited) as Ray's default policy
  does. Each decision becomes one event in `<run_dir>/events.jsonl`: which rank or node failed, how,
  the checkpoint step the next attempt starts from and the failures left, plus the full error text.
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
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import JobSpec
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.devices import worker_device
from shardyard.runtime.preemption import append_event, read_events
from shardyard.runtime.watchdog import StepWatchdog, read_heartbeats, read_stall_reports, stall_report

# Errors a rank raises because ANOTHER rank went away: never the cause when a cause is known.
TIMEOUT = re.compile(r"Timed out|timed out|Watchdog caught collective operation timeout|DistStoreError", re.I)
COLLATERAL = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|ECONNRESET|"
    r"Socket closed|NCCL communicator was aborted|ProcessGroupGloo.*peer|"
    r"Gloo connectFullMesh failed|Application timeout caused pair closure",
    re.I,
)


# ------------------------------------------------------------------------------ user errors
def as_user_error(error: BaseException) -> UserError | None:
    """The UserError an exception stands for, or None when it is not the user's to fix. A model that
    does not fit its device fails the same way on every retry."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    ):
        return UserError(
            f"the model does not fit in a worker's memory ({str(error).splitlines()[0][:200]}): "
            "reduce model.width / model.depth / training.batch_size, shard it (parallel.shard: full) "
            "or give workers more memory (resources)"
        )
    return None


def unwrap(error: BaseException) -> BaseException:
    """The exception behind Ray Train's wrappers (health-check failures wrap the actor's death)."""
    inner = getattr(error, "health_check_failure", None)
    return unwrap(inner) if isinstance(inner, BaseException) else error


# ------------------------------------------------------------------------------ describing a failure
def _first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def describe_rank_failure(rank: int, error: BaseException, heartbeats: dict[int, dict[str, Any]]) -> str:
    """One phrase: how rank `rank` failed, where it ran."""
    beat = heartbeats.get(rank, {})
    node = f", node {beat['node_id'][:8]}" if beat.get("node_id") else ""
    where = f" (pid {beat['pid']} on {beat['host']}{node})" if beat else ""
    error = unwrap(error)
    user = as_user_error(error)
    if user is not None:
        return f"rank {rank}{where}: {user}"
    from ray.exceptions import RayActorError

    if isinstance(error, RayActorError):
        text = str(error)
        if error.preempted:
            how = "its node was preempted"
        elif re.search(r"node .*(died|dead|removed)|raylet .*died|NODE_DIED|node failure", text, re.I):
            how = "its node died (raylet lost)"
        elif re.search(r"exit code 86|EXIT_STALLED", text):
            how = "ended by the step watchdog"
        else:
            how = "its process died (killed by a signal, OOM killer or a crash)"
        node = re.search(r"ip=?([0-9.]+)", text)
        return f"rank {rank}{where} died: {how}" + (f", ip {node.group(1)}" if node and not beat else "")
    return f"rank {rank}{where} raised {type(error).__name__}: {_first_line(str(error))}"


def summarise(error: TrainingFailedError, run_dir: Path, since: float, timeout_s: float) -> tuple[str, bool]:
    """(one line about the failure, whether it is a user error). A collective that timed out is
    explained by the heartbeats: the rank that stopped progressing, not the ranks that waited."""
    if isinstance(error, ControllerError):
        return f"Ray Train controller error: {_first_line(str(error.controller_failure))}", False
    if not isinstance(error, WorkerGroupError):
        return _first_line(str(error)), False
    failures = error.worker_failures
    user = [r for r, e in failures.items() if as_user_error(unwrap(e)) is not None]
    heartbeats = read_heartbeats(RunDir(run_dir).heartbeats)
    stalls = read_stall_reports(run_dir, since)
    if user:
        return describe_rank_failure(user[0], failures[user[0]], heartbeats), True
    if stalls:
        return f"hang: {stalls[0]['message']}", False
    causes = [r for r, e in sorted(failures.items()) if not COLLATERAL.search(str(unwrap(e)))]
    if causes and all(TIMEOUT.search(str(unwrap(failures[r]))) for r in causes):
        current = read_heartbeats(RunDir(run_dir).heartbeats, since)
        if current:
            world = max(max(current), max(failures)) + 1
            return f"hang: {stall_report(RunDir(run_dir).heartbeats, -1, world, timeout_s, since)['message']}", False
    ranks = causes or sorted(failures)
    phrases = [describe_rank_failure(r, failures[r], heartbeats) for r in ranks]
    return _group_phrases(phrases), False


def _group_phrases(phrases: list[str]) -> str:
    """'rank 0 (...) died: its node died' x N -> one phrase naming the node once."""
    by_how: dict[str, list[str]] = {}
    for phrase in phrases:
        who, _, how = phrase.partition(" died: ")
        by_how.setdefault(how if how else phrase, []).append(who if how else "")
    out = []
    for how, whos in by_how.items():
        if len(whos) > 1 and all(whos):
            nodes = sorted({m.group(1) for w in whos if (m := re.search(r"node (\w+)", w))})
            ranks = ", ".join(w.split(" (")[0].removeprefix("rank ") for w in whos)
            on = f" on node {', '.join(nodes)}" if nodes else ""
            out.append(f"ranks {ranks}{on} died: {how.replace('its ', 'their ', 1)}")
        else:
            out.extend(f"{w} died: {how}" if w else how for w in whos)
    text = "; ".join(out[:3])
    return text + (f"; {len(out) - 3} more" if len(out) > 3 else "")


def restart_step(run_dir: Path) -> int | None:
    latest = ckpt.find_latest_checkpoint(run_dir)
    if latest is None:
        return None
    try:
        return int(ckpt.read_meta(latest)["step"])
    except (OSError, ValueError, KeyError):
        return None


# ------------------------------------------------------------------------------ the policy
class ShardyardFailurePolicy(DefaultFailurePolicy):
    """Ray's default policy (max_failures, -1 = unlimited), except that user errors are never retried;
    every decision is recorded as an event for the driver to print."""

    def __init__(self, failure_config: Any, run_dir: str, timeout_s: float = 300.0) -> None:
        super().__init__(failure_config)
        self.run_dir = run_dir
        self.timeout_s = timeout_s
        self.attempt_start = time.time()

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        run_dir = Path(self.run_dir)
        try:
            line, user_error = summarise(training_failed_error, run_dir, self.attempt_start, self.timeout_s)
        except Exception as err:  # describing a failure must never change its handling
            line, user_error = f"{type(training_failed_error).__name__} ({err} while describing it)", False
        if user_error:
            decision = FailureDecision.RAISE
        else:
            decision = super().make_decision(training_failed_error)
        limit = self.failure_config.max_failures
        left = "unlimited" if limit == -1 else str(max(0, limit - self._worker_group_failures))
        step = restart_step(run_dir) if decision == FailureDecision.RETRY else None
        event = {
            "event": "retry" if decision == FailureDecision.RETRY else "fail",
            "message": line,
            "user_error": user_error,
            "restart_step": step,
            "failures_left": left,
            "detail": str(training_failed_error),
        }
        try:
            append_event(run_dir, event)
        except OSError:
            pass
        self.attempt_start = time.time()
        return decision


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
    return f"{type(error).__name__}: {_first_line(str(error))} (details in {RunDir(run_dir).driver_log})"


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
