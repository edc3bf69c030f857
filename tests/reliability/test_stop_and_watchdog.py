"""The pieces of graceful stop, time-based checkpoints, the watchdog and the failure policy, without
a Ray cluster: real gloo ranks for the step-boundary agreement, real threads for the watchdog."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from shardyard.comm.launch import spawn
from shardyard.comm.topology import Topology
from shardyard.platform.errors import SpecError, UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.preemption import StepBoundary, checkpoint_warning, graceful_stop
from shardyard.runtime.run_events import clear_stop, read_events, request_stop, stop_reason
from shardyard.runtime.watchdog import EXIT_STALLED, StepWatchdog, beat, read_stall_reports
from tests.helpers import tiny_spec_yaml


def spec_with(tmp_path: Path, **sections: str):
    return load_spec_text(tiny_spec_yaml("unit", tmp_path, **sections))


def _boundary_rank(topology: Topology, run_dir: str, results: str) -> None:
    import torch.distributed as dist

    spec = spec_with(Path(run_dir), checkpoint=f"{{dir: {run_dir}, every: 8, keep: 2, every_minutes: 0.5}}")
    boundary = StepBoundary(spec, Path(run_dir), topology.rank, topology.world_size, torch.device("cpu"))
    decisions = [boundary.agree(1)]  # nothing asked: both ranks go on
    if topology.rank == 0:
        boundary.last_save -= 31  # only rank 0's clock says a checkpoint is due
    decisions.append(boundary.agree(2))
    boundary.saved()
    if topology.rank == 1:
        boundary.signalled.set()  # only rank 1 got SIGTERM
    decisions.append(boundary.agree(3))
    boundary.signalled.clear()
    dist.barrier()
    if topology.rank == 0:
        request_stop(Path(run_dir), "test")  # the driver's file flag, seen by every rank
    dist.barrier()
    decisions.append(boundary.agree(4))
    Path(results, f"rank{topology.rank}").write_text(repr([(d.stop, d.checkpoint) for d in decisions]))


@pytest.mark.distributed
def test_ranks_agree_on_stop_and_time_based_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    spawn(_boundary_rank, 2, 2, str(tmp_path), str(tmp_path / "out"))
    expected = [(False, False), (False, True), (True, False), (True, False)]
    for rank in range(2):
        assert eval((tmp_path / "out" / f"rank{rank}").read_text()) == expected
    assert stop_reason(tmp_path) == "test"
    clear_stop(tmp_path)
    assert not RunDir(tmp_path).stop_request.exists() and stop_reason(tmp_path) is None


def test_first_signal_requests_a_stop_the_second_aborts(tmp_path: Path) -> None:
    messages: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with graceful_stop(tmp_path, announce=messages.append):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop_reason(tmp_path) == "SIGTERM to the driver" and "next step boundary" in messages[0]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_warning_when_no_checkpoint_would_be_written_before_the_end(tmp_path: Path) -> None:
    every_8 = spec_with(tmp_path, checkpoint=f"{{dir: {tmp_path}, every: 8}}")
    assert checkpoint_warning(every_8) is None
    at_end = spec_with(tmp_path, checkpoint=f"{{dir: {tmp_path}, every: 0}}")
    assert "no checkpoint before the end" in checkpoint_warning(at_end) and "every_minutes" in checkpoint_warning(
        at_end
    )
    timed = spec_with(tmp_path, checkpoint=f"{{dir: {tmp_path}, every: 0, every_minutes: 10}}")
    assert checkpoint_warning(timed) is None


def test_resources_fields_unlimited_failures_whole_gpus(tmp_path: Path) -> None:
    assert spec_with(tmp_path, resources="{workers: 2, max_failures: -1}").resources.max_failures == -1
    with pytest.raises(SpecError, match="max_failures"):
        spec_with(tmp_path, resources="{workers: 2, max_failures: -2}")
    with pytest.raises(SpecError, match="gpus_per_worker.*fraction"):
        spec_with(tmp_path, resources="{workers: 2, gpus_per_worker: 0.5}")
    assert spec_with(tmp_path, resources="{workers: 2, gpus_per_worker: 2}").resources.gpus_per_worker == 2


def test_watchdog_names_the_rank_that_stopped_progressing(tmp_path: Path) -> None:
    """Rank 0 keeps stepping; rank 1 stops at step 3. Rank 1's watchdog reports rank 1, with rank 0's
    position read from its heartbeat file."""
    live = StepWatchdog(tmp_path, 0, 2, timeout_s=30, attempt=1.0, period_s=0.05, exit_on_stall=False)
    stuck = StepWatchdog(tmp_path, 1, 2, timeout_s=0.6, attempt=1.0, period_s=0.05, exit_on_stall=False)
    live.start()
    stuck._write_heartbeat()
    stuck.mark(3, "training")
    stuck._thread.start()  # its own thread, without becoming the process's current watchdog
    for step in range(4, 40):
        beat(step, "step-boundary all_reduce")  # rank 0's loop
        time.sleep(0.03)
        if stuck.stall_report is not None:
            break
    live.stop()
    report = stuck.stall_report
    assert report is not None and report["stuck_rank"] == 1, report
    assert report["message"].startswith("rank 1 stopped progressing at step 3 (training)"), report["message"]
    assert "rank 0 at step" in report["message"] and "collective_timeout_minutes" in report["message"]
    assert [r["stuck_rank"] for r in read_stall_reports(tmp_path)] == [1]
    assert (RunDir(tmp_path).heartbeats / "rank0.json").exists()


def test_failure_policy_never_retries_user_errors_and_counts_the_rest(tmp_path: Path) -> None:
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from shardyard.runtime.failure_policy import ShardyardFailurePolicy, as_user_error
    from shardyard.runtime.failures import event_line

    policy = ShardyardFailurePolicy(FailureConfig(max_failures=-1), str(tmp_path))
    crash = WorkerGroupError(
        "boom",
        {
            0: RuntimeError("Connection closed by peer [127.0.0.1]:1234"),
            1: RuntimeError("CUDA error: an illegal memory access"),
        },
    )
    for _ in range(5):  # unlimited
        assert policy.make_decision(crash) == FailureDecision.RETRY
    bad = WorkerGroupError(
        "bad",
        {1: UserError("data.paths: '/nope' matches no file or directory"), 0: RuntimeError("Connection reset by peer")},
    )
    assert policy.make_decision(bad) == FailureDecision.RAISE
    events = read_events(tmp_path)[0]
    assert [e["event"] for e in events] == ["retry"] * 5 + ["fail"]
    assert events[0]["message"] == "rank 1 raised RuntimeError: CUDA error: an illegal memory access"  # not the peer
    assert event_line(events[0]) == (
        "[shardyard] fault: rank 1 raised RuntimeError: CUDA error: an illegal memory "
        "access; restarting from step 0 (no checkpoint yet) (failures left: unlimited)"
    )
    assert (
        event_line(events[-1])
        == "[shardyard] error (not retried): rank 1: data.paths: '/nope' matches no file or directory"
    )
    limited = ShardyardFailurePolicy(FailureConfig(max_failures=1), str(tmp_path))
    assert [limited.make_decision(crash) for _ in range(2)] == [FailureDecision.RETRY, FailureDecision.RAISE]
    assert "failures left: 0" in event_line(read_events(tmp_path)[0][-2])
    oom = as_user_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert isinstance(oom, UserError) and "model.width" in str(oom)
    assert as_user_error(RuntimeError("Connection closed by peer")) is None


def test_trainer_checkpoints_by_time_and_stops_with_a_checkpoint_on_request(tmp_path: Path) -> None:
    """One process: checkpoint.every_minutes makes every step due; a STOP file ends the loop after
    the first step with a checkpoint of that step and a 'stopped' event."""
    from shardyard.runtime.worker import LocalReporter, Trainer

    def trainer(name: str, checkpoint: str) -> tuple[Trainer, LocalReporter]:
        spec = load_spec_text(
            tiny_spec_yaml(
                name,
                tmp_path,
                resources="{workers: 1, cpus_per_worker: 1}",
                training="{steps: 4, batch_size: 2, eval_every: 0, eval_bytes: 2048}",
                optim="{lr: 3.0e-3, schedule: {warmup: 1}}",
                checkpoint=checkpoint,
            )
        )
        reporter = LocalReporter(tmp_path / name, keep=10)
        return Trainer(spec, tmp_path / name, reporter), reporter

    timed, reporter = trainer("timed", f"{{dir: {tmp_path}, every: 0, every_minutes: 1.0e-6}}")
    timed.fit()
    assert [m["step"] for m in reporter.metrics] == [1, 2, 3, 4]
    stopped, reporter = trainer("stopped", f"{{dir: {tmp_path}, every: 0}}")
    request_stop(tmp_path / "stopped", "test")
    stopped.fit()
    assert stopped.step == 1 and [m["step"] for m in reporter.metrics] == [1]
    assert (tmp_path / "stopped" / "checkpoint_00000001" / "manifest.json").exists()
    assert [(e["event"], e["step"]) for e in read_events(tmp_path / "stopped")[0]] == [("stopped", 1)]


def test_stop_command_writes_the_request_into_a_run_directory(tmp_path: Path, capsys) -> None:
    from shardyard.cli.main import main

    (tmp_path / "spec.yaml").write_text("name: x\n")
    assert main(["stop", str(tmp_path)]) == 0
    assert stop_reason(tmp_path) == "shardyard stop" and "next step boundary" in capsys.readouterr().out


def _hanging_rank(topology: Topology, run_dir: str) -> None:
    """Rank 1 sleeps instead of joining step 3's boundary all_reduce; rank 0 waits inside it."""
    spec = spec_with(Path(run_dir), resources="{workers: 2, collective_timeout_minutes: 0.04}")
    boundary = StepBoundary(spec, Path(run_dir), topology.rank, topology.world_size, torch.device("cpu"))
    with StepWatchdog(
        Path(run_dir), topology.rank, 2, timeout_s=spec.resources.collective_timeout_minutes * 60, attempt=1.0
    ):
        for step in range(1, 6):
            boundary.agree(step)


def _exit_codes(fn, world: int, *args: object, limit_s: float = 50.0) -> tuple[list[int | None], float]:
    """Start `world` gloo ranks as `spawn` does, without its first-failure-wins join: every rank's exit
    code (negative: killed by that signal), and the seconds until the last one ended."""
    import tempfile

    from shardyard.comm import launch

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shardyard-pg-") as tmp:
        context = launch.start_ranks(fn, world, world, os.path.join(tmp, "store"), args, join=False)
        for process in context.processes:
            process.join(max(0.0, limit_s - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
        return [process.exitcode for process in context.processes], elapsed


@pytest.mark.distributed
def test_a_rank_that_sleeps_in_a_collective_ends_the_attempt_naming_it(tmp_path: Path, monkeypatch) -> None:
    """Real processes and a real gloo all_reduce: the sleeping rank's watchdog ends its process with
    EXIT_STALLED after 2.4 s without progress, its peer's collective fails (or its own watchdog ends
    it), and the report names rank 1 and the step."""
    monkeypatch.setenv("SHARDYARD_HANG_AT", "3:1:600")
    codes, elapsed = _exit_codes(_hanging_rank, 2, str(tmp_path))
    # Without the watchdog rank 1 would wake after 600 s and both would finish with 0.
    assert EXIT_STALLED == 86  # the code the failure policy recognises ("exit code 86", runtime/failures.py)
    assert codes[1] == EXIT_STALLED, codes
    assert codes[0] in (EXIT_STALLED, 1), codes  # its own watchdog, or the gloo error its peer's exit raised
    assert elapsed < 300, elapsed  # far below the 600 s sleep, with room for a loaded machine
    reports = read_stall_reports(tmp_path)  # either rank's watchdog may fire first; both name rank 1
    assert reports and all(r["stuck_rank"] == 1 for r in reports), reports
    assert any(r["reporter"] == 1 for r in reports), reports  # rank 1's exit came from its own watchdog
    # Heartbeat files are written every 0.6 s: the last one rank 1 wrote shows step 3 or step 2.
    assert all(
        r["message"].startswith(
            ("rank 1 stopped progressing at step 3 (training)", "rank 1 stopped progressing at step 2")
        )
        for r in reports
    ), reports


def test_a_lost_node_is_one_line_naming_all_its_ranks_even_those_ray_train_had_not_polled(tmp_path: Path) -> None:
    """Ray Train reports the ranks of a dead node that it had polled by then (seen: only the first of
    two). The line names every rank of this attempt whose heartbeat places it on that node, once,
    and not the collateral ranks of the surviving node."""
    import json

    from ray.exceptions import RayActorError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from shardyard.runtime.failure_policy import summarise

    beats = RunDir(tmp_path).heartbeats
    beats.mkdir(parents=True)
    for rank, node in ((0, "aaaa1111bbbb"), (1, "aaaa1111bbbb"), (2, "cccc2222dddd"), (3, "cccc2222dddd")):
        record = {"rank": rank, "attempt": 5.0, "node_id": node, "pid": 100 + rank, "host": "h", "step": 3}
        (beats / f"rank{rank}.json").write_text(json.dumps(record))
    died = RayActorError(error_msg="The actor died because its node has died. Node Id: cccc2222dddd NODE_DIED")
    failure = WorkerGroupError("lost", {2: died, 0: RuntimeError("Connection closed by peer [10.0.0.3]:4000")})
    line, user_error = summarise(failure, tmp_path, since=0.0, timeout_s=300.0)
    assert not user_error
    assert line == "ranks 2, 3 on node cccc2222 died: their node died (raylet lost)", line
