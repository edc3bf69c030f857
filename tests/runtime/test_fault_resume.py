"""A run that dies (a rank raising, a rank's process exiting mid-save) and is started again resumes
from its newest complete checkpoint and ends with the uninterrupted run's losses and gradient norms:
the Trainer on 2 gloo ranks, started twice. That Ray Train restarts a failed group by itself is shown
on Ray (tests/runtime/test_ray_training.py, test_dispatch_cluster.py, tests/reliability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard import envvars
from shardyard.platform.spec import load_spec
from shardyard.tracking.logger import read_events
from tests.helpers import train_on_gloo
from tests.runtime.fault_runs import assert_same_losses, fault_spec

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def resumed_from(run_dir: Path) -> list[int]:
    return [event["step"] for event in read_events(run_dir) if event["event"] == "resume"]


def die_then_resume(spec, run_dir: Path) -> None:  # noqa: ANN001
    with pytest.raises(Exception, match="exit code 17|injected fault"):
        train_on_gloo(spec, run_dir, 2)
    train_on_gloo(spec, run_dir, 2, resume=True)  # the hooks fire once: their marker files exist now


def test_deepspeed_zero2_with_a_crash_matches_ddp(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 raising at step 9 under ZeRO-2: started again, the run resumes from the step-8 checkpoint
    and ends with the uninterrupted DDP run's losses and gradient norms."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv(envvars.FAULT_STEP, "9")
    spec = load_spec(fault_spec(tmp_path), ["name=zero2", "parallel.zero=2"])
    run_dir = tmp_path / "runs" / "zero2"
    die_then_resume(spec, run_dir)
    assert (run_dir / ".injected_fault_done").read_text() == "9"
    assert resumed_from(run_dir) == [8]
    assert_same_losses(run_dir, uninterrupted, 1e-4)  # against DDP


def test_a_worker_killed_mid_save_resumes_from_the_previous_checkpoint(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last rank's process exits after writing its shards of the step-8 checkpoint, before the
    manifest: started again, the run skips that partial checkpoint, resumes from step 4 and ends with
    the uninterrupted losses."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(envvars.KILL_IN_SAVE, f"8:{marker}")
    spec = load_spec(fault_spec(tmp_path), ["name=killed"])
    run_dir = tmp_path / "runs" / "killed"
    die_then_resume(spec, run_dir)
    assert marker.read_text() == "8"
    assert resumed_from(run_dir) == [4]
    assert_same_losses(run_dir, uninterrupted, 1e-5)
