"""Rank-0 metric logging: metrics.jsonl always, wandb (offline / online / disabled) alongside.

A job keeps one wandb run id across restarts (stored in the run directory), so the offline
directories of a restarted job can be stitched with `wandb sync --id ID DIR...`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import uuid
from pathlib import Path
from typing import Any

from shardyard.platform.schema import JobSpec

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: Path) -> str:
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = f"{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{WANDB_ID_FILE}.tmp")
    tmp.write_text(run_id)
    os.replace(tmp, path)
    return run_id


def _start_wandb(spec: JobSpec, run_dir: Path, attempts: int = 6):
    """The job's wandb run (one id for every restart), or None with one warning when wandb cannot
    start: tracking must never stop training; metrics.jsonl has every record anyway. A restarted
    worker group can find its run id still held by the killed group's wandb process for a few
    seconds ("run ID ... is in use"): retry before giving up."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    for attempt in range(attempts):
        try:
            return wandb.init(
                project=spec.tracking.wandb_project,
                name=spec.tracking.run_name or spec.name,
                id=wandb_run_id(run_dir),
                group=spec.name,
                tags=spec.tracking.tags,
                dir=str(run_dir),
                mode=spec.tracking.mode,
                config=json.loads(spec.model_dump_json()),
                resume="allow",
                reinit="finish_previous",
            )
        except Exception as err:  # wandb raises its own error types from its service
            if attempt == attempts - 1:
                warnings.warn(f"wandb could not start ({type(err).__name__}: {err}); this run logs to "
                              f"{run_dir / METRICS_FILE} only", RuntimeWarning, stacklevel=2)
                return None
            time.sleep(2.0 * (attempt + 1))
    return None


class MetricsLogger:
    """Writes metric records; a no-op on ranks other than 0."""

    def __init__(self, spec: JobSpec, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._file = None
        self._wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)
        if spec.tracking.mode != "disabled":
            self._wandb_run = _start_wandb(spec, run_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of a run, the last one per (step, kind) kept (a restart re-logs replayed steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        latest[(record["step"], record.get("kind", "train"))] = record
    return [latest[k] for k in sorted(latest)]
