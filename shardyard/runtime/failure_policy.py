"""The Ray Train controller's failure policy, and the one line that describes a failure.

`ShardyardFailurePolicy` runs in the controller: a `UserError` raised on any worker (bad data path,
corpus too small, a model that cannot fit) fails the job at once instead of being retried;
everything else follows `resources.max_failures` (-1 = unlimited) as Ray's default policy does.
Each decision becomes one event in `<run_dir>/events.jsonl`: which rank or node failed, how, the
checkpoint step the next attempt starts from and the failures left, plus the full error text.

The controller process unpickles this module's policy when it starts, so the module imports
neither torch nor the Trainer (that cost every job ~1 s of start-up before its first step).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.runtime.run_events import append_event
from shardyard.runtime.watchdog import read_heartbeats, read_stall_reports, stall_report

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
    torch = sys.modules.get("torch")  # a torch error exists only where torch is imported; the controller has not
    if (torch is not None and isinstance(error, torch.OutOfMemoryError)) or (
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
def first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def describe_rank_failure(rank: int, error: BaseException, heartbeats: dict[int, dict[str, Any]]) -> str:
    """One phrase: how rank `rank` failed, where it ran."""
    beat = heartbeats.get(rank, {})
    where = _where(beat)
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
            how = NODE_DIED
        elif re.search(r"exit code 86|EXIT_STALLED", text):
            how = "ended by the step watchdog"
        else:
            how = "its process died (killed by a signal, OOM killer or a crash)"
        node = re.search(r"ip=?([0-9.]+)", text)
        return f"rank {rank}{where} died: {how}" + (f", ip {node.group(1)}" if node and not beat else "")
    return f"rank {rank}{where} raised {type(error).__name__}: {first_line(str(error))}"


NODE_DIED = "its node died (raylet lost)"


def _where(beat: dict[str, Any]) -> str:
    node = f", node {beat['node_id'][:8]}" if beat.get("node_id") else ""
    return f" (pid {beat['pid']} on {beat['host']}{node})" if beat else ""


def _ranks_on_lost_nodes(ranks: list[int], phrases: list[str], heartbeats: dict[int, dict[str, Any]]) -> list[str]:
    """A dead node takes all of its ranks, but Ray Train reports the ones it had polled by then: the
    others of this attempt on the same node (from their heartbeats) died the same way."""
    lost = {
        heartbeats[rank]["node_id"]
        for rank, phrase in zip(ranks, phrases)
        if phrase.endswith(NODE_DIED) and heartbeats.get(rank, {}).get("node_id")
    }
    others = sorted(r for r, beat in heartbeats.items() if r not in ranks and beat.get("node_id") in lost)
    return [f"rank {r}{_where(heartbeats[r])} died: {NODE_DIED}" for r in others]


def summarise(error: TrainingFailedError, run_dir: Path, since: float, timeout_s: float) -> tuple[str, bool]:
    """(one line about the failure, whether it is a user error). A collective that timed out is
    explained by the heartbeats: the rank that stopped progressing, not the ranks that waited."""
    if isinstance(error, ControllerError):
        return f"Ray Train controller error: {first_line(str(error.controller_failure))}", False
    if not isinstance(error, WorkerGroupError):
        return first_line(str(error)), False
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
    return _group_phrases(phrases + _ranks_on_lost_nodes(ranks, phrases, heartbeats)), False


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
    """The step the next attempt resumes from. Imports the checkpoint module (and torch) on the first
    failure only: the controller runs this module and starts without them."""
    from shardyard.runtime import checkpoint as ckpt

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
