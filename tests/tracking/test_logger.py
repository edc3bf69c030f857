"""MetricsLogger: metrics.jsonl on rank 0 only, an offline wandb run on disk, one wandb id per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


_HOLD_SERVICE = """
import os, time, wandb
wandb.setup()
print(os.environ.get("WANDB_SERVICE", ""), flush=True)
time.sleep(600)
"""

_OPEN_RUN = """
import sys, time
from pathlib import Path
from shardyard.platform.spec import load_spec_text
from shardyard.tracking.logger import MetricsLogger
logger = MetricsLogger(load_spec_text(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), enabled=True)
print("wandb" if logger._wandb_run is not None else "no wandb", flush=True)
Path(sys.argv[3]).write_text("open")
time.sleep(float(sys.argv[4]))
logger.close()
"""


def test_a_restarted_rank_reopens_its_wandb_run_at_once_under_an_inherited_wandb_service(tmp_path: Path) -> None:
    """A raylet started by a process that runs wandb hands its workers that process's service address
    (WANDB_SERVICE). A rank SIGKILLed with its run open, then restarted, must reopen the same run at
    once: a foreign service outlives the rank and keeps holding the run id."""
    # the process that started the raylet, running wandb: its service's address is in its environment
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        _restart_under(holder.stdout.readline().strip(), tmp_path)
    finally:
        holder.kill()
        holder.wait()


def _restart_under(service: str, tmp_path: Path) -> None:
    assert service, "precondition: the holder's service address"
    env = {**os.environ, "WANDB_SERVICE": service}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(tiny_spec_yaml("logged", tmp_path, tracking="{mode: offline}"))
    run_dir, opened = tmp_path / "logged", tmp_path / "opened"
    killed = subprocess.Popen(
        [sys.executable, "-c", _OPEN_RUN, str(spec_file), str(run_dir), str(opened), "600"], env=env
    )
    deadline = time.time() + 120
    while not opened.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert opened.exists(), "the first rank never opened its run"
    killed.kill()
    killed.wait()
    opened.unlink()
    start = time.monotonic()
    restarted = subprocess.run(
        [sys.executable, "-c", _OPEN_RUN, str(spec_file), str(run_dir), str(opened), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert restarted.returncode == 0 and restarted.stdout.strip() == "wandb", restarted.stdout + restarted.stderr
    assert took < 20, f"the restarted rank took {took:.1f} s to open its run (the retries wait 30 s)"
