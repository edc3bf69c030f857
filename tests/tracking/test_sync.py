"""One wandb run per job across a resume (read back from the offline run files), its stable metric
prefixes, and `shardyard sync` (the command it runs, and its refusal without credentials)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.cli.main import main
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.worker import LocalReporter, Trainer
from shardyard.tracking.logger import PREFIXES, STEP_KEY
from shardyard.tracking.sync import offline_run_id, offline_runs, read_history
from tests.helpers import tiny_spec_yaml


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job trained to step 4, then resumed to step 8 by a second Trainer (a second attempt)."""
    root = tmp_path_factory.mktemp("wandb")
    for steps, resume in ((4, False), (8, True)):
        spec = load_spec_text(
            tiny_spec_yaml(
                "synced",
                root,
                resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
                data="{paths: [stdlib], seq_len: 32, max_bytes: 400000}",
                optim="{lr: 3.0e-3, schedule: {warmup: 2}}",
                training=f"{{steps: {steps}, batch_size: 4, eval_every: 4, eval_bytes: 1024, log_every: 1}}",
                checkpoint=f"{{dir: {root}, every: 4, keep: 2}}",
                tracking="{mode: offline, tags: [api_token_test]}",
            )
        )
        run_dir = root / "synced"
        trainer = Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep))
        trainer.resume(ckpt.find_latest_checkpoint(run_dir) if resume else None)
        trainer.fit()
    return run_dir


def test_a_resumed_job_appends_to_its_one_wandb_run(resumed_run: Path) -> None:
    run_id = RunDir(resumed_run).wandb_id.read_text().strip()
    attempts = offline_runs(resumed_run)
    assert len(attempts) == 2 and all(offline_run_id(a) == run_id for a in attempts)  # 2 starts in 1 s: "-1"
    series: dict[int, float] = {}
    evals: dict[int, float] = {}
    for attempt in attempts:
        file_id, rows = read_history(next(attempt.glob(f"run-{run_id}.wandb")))
        assert file_id == run_id
        for row in rows:
            names = {k for k in row if not k.startswith("_") and k != STEP_KEY}
            assert all(k.startswith(PREFIXES) for k in names), names
            if "train/loss" in row:
                series[row[STEP_KEY]] = row["train/loss"]
            if "eval/bpb" in row:
                evals[row[STEP_KEY]] = row["eval/bpb"]
    assert sorted(series) == list(range(1, 9)) and sorted(evals) == [4, 8]
    from tests.helpers import train_losses

    assert series == pytest.approx(train_losses(resumed_run), rel=1e-6)  # the same series as metrics.jsonl


def test_sync_stitches_every_attempt_under_the_run_id(resumed_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sync", str(resumed_run), "--dry-run"]) == 0
    command = capsys.readouterr().out.split()
    run_id = RunDir(resumed_run).wandb_id.read_text().strip()
    assert command[1:6] == ["sync", "--id", run_id, "--project", "shardyard"]
    assert command[6:] == [str(p) for p in offline_runs(resumed_run)]  # oldest attempt first


def test_sync_without_credentials_is_refused_before_any_upload(
    resumed_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert main(["sync", str(resumed_run)]) == 2
    err = capsys.readouterr().err
    assert "no wandb credentials" in err and "nothing was uploaded" in err and "Traceback" not in err


def test_sync_of_a_directory_without_offline_runs_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sync", str(tmp_path)]) == 2
    assert f"{tmp_path}: no offline wandb runs" in capsys.readouterr().err
