"""Rank-0 metric logging: metrics.jsonl always, wandb (offline / online / disabled) alongside.

A job keeps one wandb run id across restarts (stored in the run directory), so the offline
directories of a restarted job can be stitched with `wandb sync --id ID DIR...` (`shardyard sync`).

metrics.jsonl keeps the short names the tools read (loss, bpb, val_bpb, tokens_per_s, time/...,
moe/..., comm/...); wandb gets every metric under one of six stable prefixes (`train/`, `eval/`,
`time/`, `mem/`, `moe/`, `comm/`, see `wandb_key`), all plotted against `trainer/step` (declared
with define_metric), so a resumed run's replayed steps land on the right x position instead of
being dropped as out of order by wandb's own step counter.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import JobSpec

STEP_KEY = "trainer/step"
PREFIXES = ("train/", "eval/", "time/", "mem/", "moe/", "comm/")
_RENAMED = {
    "val_bpb": "eval/bpb",
    "val_bpb_stderr": "eval/bpb_stderr",
    "val_windows": "eval/windows",
    "val_control_gain": "eval/control_gain",
    "eval_s": "time/eval_s",
}
_NOT_METRICS = {"kind", "total_steps", "event"}
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|api_?key|credential|private)", re.IGNORECASE)


def wandb_key(name: str) -> str:
    """The wandb name of a metrics.jsonl key: val/<set>_bpb -> eval/<set>_bpb, val_bpb -> eval/bpb,
    prefixed names kept, everything else under train/."""
    if name in _RENAMED:
        return _RENAMED[name]
    if name.startswith("val/"):
        return "eval/" + name[len("val/") :]
    if name.startswith(PREFIXES):
        return name
    return "train/" + name


def redacted(value: Any, key: str = "") -> Any:
    """A config tree with the values of secret-looking keys (token, api_key, password, ...) replaced."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if key and _SECRET_NAME.search(key) and value not in (None, "", False):
        return "<redacted>"
    return value


def wandb_run_id(run_dir: Path) -> str:
    path = RunDir(run_dir).wandb_id
    if path.exists():
        return path.read_text().strip()
    run_id = f"{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.tmp")
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
    # This process starts its own wandb service, so the run ends when it does. An inherited service
    # address (from whatever started the raylet) belongs to a process that outlives a killed worker and
    # keeps holding the run id: the restarted group then retried for 30 s and logged without wandb.
    os.environ.pop("WANDB_SERVICE", None)
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
                config=redacted(json.loads(spec.model_dump_json())),
                resume="allow",
                reinit="finish_previous",
            )
        except Exception as err:  # wandb raises its own error types from its service
            if attempt == attempts - 1:
                warnings.warn(
                    f"wandb could not start ({type(err).__name__}: {err}); this run logs to "
                    f"{RunDir(run_dir).metrics} only",
                    RuntimeWarning,
                    stacklevel=2,
                )
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
        self._file = open(RunDir(run_dir).metrics, "a", buffering=1)
        if spec.tracking.mode != "disabled":
            self._wandb_run = _start_wandb(spec, run_dir)
        if self._wandb_run is not None:
            self._wandb_run.define_metric(STEP_KEY)
            for prefix in PREFIXES:
                self._wandb_run.define_metric(f"{prefix}*", step_metric=STEP_KEY)

    def describe(self, facts: dict[str, Any]) -> None:
        """Facts about the run (FLOPs per token, the peak used for MFU, ...): run_info.json and wandb config."""
        if not self.enabled:
            return
        info = RunDir(self.run_dir).run_info
        tmp = info.with_name(f".{info.name}.tmp")
        tmp.write_text(json.dumps(facts, indent=1))
        os.replace(tmp, info)
        if self._wandb_run is not None:
            self._wandb_run.config.update({"run_info": facts}, allow_val_change=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None and metrics.get("kind") != "event":
            values = {
                wandb_key(k): v for k, v in metrics.items() if k not in _NOT_METRICS and isinstance(v, (int, float))
            }
            self._wandb_run.log({STEP_KEY: step, **values})

    def image(self, step: int, key: str, rgb: Any, caption: str) -> None:
        """An image (H x W x 3 uint8) to wandb at `step`; nothing when wandb is off."""
        if not self.enabled or self._wandb_run is None:
            return
        import wandb

        self._wandb_run.log({STEP_KEY: step, key: wandb.Image(rgb, caption=caption)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(Path(run_dir)).metrics
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Metric records of a run, the last one per (step, kind) kept (a restart re-logs replayed steps)."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for record in _records(run_dir):
        if record.get("kind") != "event":
            latest[(record["step"], record.get("kind", "train"))] = record
    return [latest[k] for k in sorted(latest)]


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's start / resume events in the order they happened (every attempt logs one)."""
    return [r for r in _records(run_dir) if r.get("kind") == "event"]
