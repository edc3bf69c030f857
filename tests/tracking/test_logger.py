"""MetricsLogger: metrics.jsonl on rank 0 only, an offline wandb run on disk, one wandb id per job."""

from __future__ import annotations

import json
from pathlib import Path

from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text
from shardyard.tracking.logger import MetricsLogger, read_metrics, wandb_key
from tests.helpers import tiny_spec_yaml


def _spec(tmp_path: Path, mode: str):
    return load_spec_text(tiny_spec_yaml("logged", tmp_path, tracking=f"{{mode: {mode}}}"))


def test_rank_zero_writes_jsonl_and_an_offline_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "logged"
    logger = MetricsLogger(_spec(tmp_path, "offline"), run_dir, enabled=True)
    logger.log(1, {"kind": "train", "loss": 5.5, "bpb": 7.9})
    logger.log(2, {"kind": "train", "loss": 5.0, "bpb": 7.2})
    logger.log(2, {"kind": "eval", "val_bpb": 7.4})
    logger.close()
    lines = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in lines] == [(1, "train"), (2, "train"), (2, "eval")]
    assert lines[1]["loss"] == 5.0 and lines[2]["val_bpb"] == 7.4 and all("time" in r for r in lines)
    run_id = RunDir(run_dir).wandb_id.read_text().strip()
    logs = list(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0


def test_other_ranks_write_nothing_and_disabled_wandb_writes_only_jsonl(tmp_path: Path) -> None:
    quiet = tmp_path / "rank1"
    logger = MetricsLogger(_spec(tmp_path, "offline"), quiet, enabled=False)
    logger.log(1, {"kind": "train", "loss": 1.0})
    logger.close()
    assert not quiet.exists()
    run_dir = tmp_path / "nowandb"
    logger = MetricsLogger(_spec(tmp_path, "disabled"), run_dir, enabled=True)
    logger.log(1, {"kind": "train", "loss": 1.0})
    logger.close()
    assert sorted(p.name for p in run_dir.iterdir()) == [RunDir(run_dir).metrics.name]


def test_read_metrics_keeps_the_last_record_per_step_and_skips_a_cut_line(tmp_path: Path) -> None:
    """A restart re-logs the steps after its checkpoint; a crash can leave half a line at the end."""
    records = [
        {"step": 1, "kind": "train", "loss": 3.0},
        {"step": 2, "kind": "train", "loss": 2.0},
        {"step": 2, "kind": "eval", "val_bpb": 4.0},
        {"step": 2, "kind": "train", "loss": 1.5},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "kind": "tr'
    RunDir(tmp_path).metrics.write_text(text)
    got = read_metrics(tmp_path)
    assert [(r["step"], r["kind"]) for r in got] == [(1, "train"), (2, "eval"), (2, "train")]
    assert got[2]["loss"] == 1.5
    assert read_metrics(tmp_path / "missing") == []


def test_wandb_names_of_the_metrics_keys() -> None:
    assert wandb_key("val_bpb") == "eval/bpb" and wandb_key("val_bpb_stderr") == "eval/bpb_stderr"
    assert wandb_key("val_control_gain") == "eval/control_gain" and wandb_key("val/own_bpb") == "eval/own_bpb"
    assert wandb_key("eval_s") == "time/eval_s" and wandb_key("comm/bytes_internode") == "comm/bytes_internode"
    assert wandb_key("loss") == "train/loss"
