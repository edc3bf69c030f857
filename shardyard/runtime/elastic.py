"""Elastic worker groups (`resources.workers: {min, max}`): Ray Train's elastic scaling, resized at a
checkpoint, and the one line the user reads per resize.

Ray Train 2.60 starts an elastic group once `min` workers fit, asks the cluster for `max`, and every
`elastic_resize_monitor_interval_s` (`resources.resize_interval_s`) compares the workers that would
fit with the running group; a different count restarts the group from the newest reported
checkpoint. A lost node fails the group; the restart then takes the workers that fit (>= min)
without waiting for the node.

`CheckpointFirstPolicy` (runs in the Ray Train controller) turns a planned resize into: ask the
running ranks for a checkpoint at an agreed step boundary (run_events.request_resize), wait until
they report it and hold, then resize. The new group resumes from exactly that step: growing redoes
nothing. A node loss redoes the steps since the newest checkpoint.

`announce_resize` (rank 0 of the restarted group) records one event, which the driver prints as
`workers 4 -> 2 (node 1a2b3c4d lost), ep 4 -> 2, micro-batch 3 x accum 2, resuming from step 12`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shardyard.runtime.run_events import append_event, clear_resize, read_events, request_resize, resize_ready_step


# ------------------------------------------------------------------------------ controller side
def checkpoint_first_policy(scaling_config: Any, run_dir: Path) -> Any:
    """Ray's ElasticScalingPolicy, except that a resize of a running group waits for its checkpoint."""
    import ray
    from ray.train.v2._internal.execution.scaling_policy import (
        ElasticScalingPolicy,
        NoopDecision,
        ResizeDecision,
    )
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
        AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
    )

    class CheckpointFirstPolicy(ElasticScalingPolicy):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.run_dir = str(run_dir)
            self.pending: Any = None  # the resize decided, waiting for the group's checkpoint
            self.fresh = False  # deciding a (re)start: ask for a view of the live nodes

        def make_decision_for_non_running_worker_group(self) -> Any:
            self.pending = None  # (re)starting anyway: an unanswered request is void
            clear_resize(Path(self.run_dir))
            self.fresh = True
            try:
                return super().make_decision_for_non_running_worker_group()
            finally:
                self.fresh = False

        def _get_reserved_resources(self) -> Any:
            """Before a (re)start, the coordinator's view recomputed from the live nodes: its periodic
            view (every 20 s) still counts a node that just died, and a group sized to it could not
            be placed (Ray would wait for it, then fail the start)."""
            if not getattr(self, "fresh", False):
                return super()._get_reserved_resources()
            try:
                reserved = ray.get(
                    self._autoscaling_coordinator.get_reserved_resources.remote(self._requester_id, recompute=True),
                    timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
                )
            except Exception:  # the coordinator is busy or gone: its cached view, as Ray's own policy does
                return super()._get_reserved_resources()
            self._latest_reserved_resources = reserved
            return reserved

        def make_decision_for_running_worker_group(self, worker_group_state: Any, worker_group_status: Any) -> Any:
            run = Path(self.run_dir)
            if self.pending is None:
                decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
                if not isinstance(decision, ResizeDecision):
                    return decision
                self.pending = decision
                request_resize(run, decision.num_workers)
                append_event(
                    run,
                    {
                        "event": "resize_request",
                        "from": worker_group_state.num_workers,
                        "to": decision.num_workers,
                    },
                )
                return NoopDecision()
            self._maybe_send_resource_request()
            if resize_ready_step(run) is None:
                return NoopDecision()
            decision, self.pending = self.pending, None
            clear_resize(run)
            return decision

    return CheckpointFirstPolicy(scaling_config)


# ------------------------------------------------------------------------------ the event
def _cause(run_dir: Path, before: int, after: int) -> str:
    """Why the group changed size, from the run's events since the previous resize: a planned resize,
    else the lost node a fault names (before later faults of the restart itself), else the first fault."""
    events, _ = read_events(run_dir)
    since = [e for e in events[_last_index(events, "resize") + 1 :] if e.get("event") in ("resize_request", "retry")]
    if since and since[-1].get("event") == "resize_request":
        return f"room for {after}" if after > before else f"{before - after} fewer fit"
    messages = [str(e.get("message", "")) for e in since if e.get("event") == "retry"]
    for message in messages:
        node = re.search(r"node (\w+)", message)
        if node and re.search(r"node died|was preempted|raylet", message):
            return f"node {node.group(1)} lost"
    return messages[0] if messages else "cluster resources changed"


def _last_index(events: list[dict[str, Any]], kind: str) -> int:
    return max((i for i, e in enumerate(events) if e.get("event") == kind), default=-1)


def announce_resize(run_dir: Path, before: dict[str, Any], after: dict[str, Any], step: int) -> None:
    """Rank 0 of a group that resumed at another world size: one `resize` event (the driver prints it)."""
    event = {
        "event": "resize",
        "step": step,
        "from": before,
        "to": after,
        "cause": _cause(run_dir, int(before.get("world") or 0), int(after["world"])),
    }
    append_event(run_dir, event)
    print(f"[shardyard] {resize_line(event)}", flush=True)


def resize_line(event: dict[str, Any]) -> str:
    before, after = event["from"], event["to"]
    parts = [f"workers {before.get('world')} -> {after['world']} ({event['cause']})"]
    if before.get("ep", after["ep"]) != after["ep"] or after["ep"] > 1:
        parts.append(f"ep {before.get('ep', '?')} -> {after['ep']}")
    parts.append(f"micro-batch {after['micro_batch']} x accum {after['accum']}")
    parts.append(f"resuming from step {event['step']}")
    return ", ".join(parts)
