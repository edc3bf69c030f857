"""Driver side of a job: build a Ray Train TorchTrainer from the spec and run it.

`run_training` is called by `shardyard run` (embedded local cluster) and by the Ray job's
entrypoint (`python -m shardyard.cli.job_entry`, what `shardyard submit` launches). Re-running a job
with the same name and storage resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import SPEC_FILE, RunDir
from shardyard.platform.schema import JobSpec
from shardyard.platform.spec import load_spec, spec_to_yaml
from shardyard.runtime.checkpoint import find_latest_checkpoint, read_meta
from shardyard.runtime.preemption import EXIT_STOPPED, graceful_stop
from shardyard.runtime.run_events import clear_resize, clear_stop, stop_reason
from shardyard.tracking.logger import read_metrics


@dataclass
class TrainingResult:
    run_dir: Path
    final_step: int
    metrics: dict[str, Any]
    checkpoint: str | None
    error: str | None
    stopped: str | None = None  # why the run stopped early with a checkpoint (graceful stop)

    @property
    def exit_code(self) -> int:
        return 1 if self.error else EXIT_STOPPED if self.stopped else 0


def write_run_files(spec: JobSpec, run_dir: Path) -> None:
    """The run's spec file (the spec of the newest start) and its spec history (every spec used, kept)."""
    from shardyard.runtime.resume_guard import record_spec_history

    run_dir.mkdir(parents=True, exist_ok=True)
    text = spec_to_yaml(spec)
    record_spec_history(run_dir, text)
    spec_file = RunDir(run_dir).spec_file
    tmp = spec_file.with_name(f".{spec_file.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, spec_file)


def build_trainer(spec: JobSpec, run_dir: Path):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from shardyard.runtime.elastic import checkpoint_first_policy
    from shardyard.runtime.failures import build_torch_trainer
    from shardyard.runtime.worker import train_loop_per_worker

    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    if res.memory_per_worker is not None:
        per_worker["memory"] = float(res.memory_per_worker_bytes)
    name, storage = RunDir.checkpoint_storage(spec, run_dir)
    workers = (res.min_workers, res.max_workers) if res.elastic else res.min_workers
    return build_torch_trainer(
        run_dir,
        res.collective_timeout_minutes * 60,
        scaling_policy=(lambda config: checkpoint_first_policy(config, run_dir)) if res.elastic else None,
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"spec_json": spec.model_dump_json(), "run_dir": str(run_dir)},
        torch_config=TorchConfig(timeout_s=max(1, round(res.collective_timeout_minutes * 60))),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            elastic_resize_monitor_interval_s=res.resize_interval_s,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )


def run_training(
    spec: JobSpec, run_dir: Path, on_progress: Callable[[list[dict]], None] | None = None
) -> TrainingResult:
    """Train `spec` on the connected Ray cluster; blocks until done. `on_progress` gets new metric
    records. Holds the run directory's lease throughout: a second job on the same run is refused.
    SIGTERM/SIGINT (main thread) stop the run with a checkpoint at the next step boundary; faults
    print one line each; the workers' full output goes to <run_dir>/driver.log."""
    from shardyard.runtime.run_lease import hold_lease

    with hold_lease(run_dir):
        return _run_training(spec, run_dir, on_progress)


def _run_training(spec: JobSpec, run_dir: Path, on_progress: Callable[[list[dict]], None] | None) -> TrainingResult:
    from shardyard.runtime.failures import EventPrinter, failure_summary, route_worker_output

    write_run_files(spec, run_dir)
    clear_stop(run_dir)
    clear_resize(run_dir)
    if spec.data.prepared:  # tokenize + pack once, on the cluster, before any worker starts
        from shardyard.data.prepare import prepare

        prepared = prepare(spec.data, show_progress=True)
        if not prepared.skipped:
            print(f"[shardyard] prepared {prepared.directory} at {prepared.mb_per_s:.2f} MB/s", flush=True)
    trainer = build_trainer(spec, run_dir)
    timeout_s = spec.resources.collective_timeout_minutes * 60
    stop = threading.Event()
    note = getattr(on_progress, "note", None)  # a live display that can print a line above itself
    events = EventPrinter(run_dir, out=note) if callable(note) else EventPrinter(run_dir)
    watcher = threading.Thread(
        target=_watch_metrics, args=(RunDir(run_dir).metrics, on_progress, stop, events.poll), daemon=True
    )
    watcher.start()
    restore_output = route_worker_output(run_dir)
    error = None
    try:
        with graceful_stop(run_dir):
            result = trainer.fit()
        checkpoint = result.checkpoint.path if result.checkpoint else None
        error = failure_summary(result.error, run_dir, timeout_s) if getattr(result, "error", None) else None
    except Exception as err:  # Ray Train raises TrainingFailedError once max_failures is exhausted
        checkpoint, error = None, failure_summary(err, run_dir, timeout_s)
    finally:
        stop.set()
        watcher.join(timeout=5)
        restore_output()
    records = read_metrics(run_dir)
    last_train = next((r for r in reversed(records) if r.get("kind") == "train"), {})
    last_eval = next((r for r in reversed(records) if r.get("kind") == "eval"), {})
    metrics = {**last_train, **{k: v for k, v in last_eval.items() if k.startswith("val")}}
    final_step = int(metrics.get("step", 0))
    stopped = stop_reason(run_dir) if final_step < spec.training.steps and not error else None
    return TrainingResult(run_dir, final_step, metrics, checkpoint, error, stopped)


def _watch_metrics(
    path: Path, on_progress: Callable[[list[dict]], None] | None, stop: threading.Event, poll_events: Callable[[], None]
) -> None:
    offset = path.stat().st_size if path.exists() else 0  # only what this run appends
    while not stop.wait(0.5):
        offset = _emit_new(path, offset, on_progress)
        poll_events()
    _emit_new(path, offset, on_progress)
    poll_events()


def _emit_new(path: Path, offset: int, on_progress: Callable[[list[dict]], None] | None) -> int:
    if on_progress is None or not path.exists():
        return offset
    with open(path) as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    records = []
    for line in complete.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    if records:
        on_progress(records)
    return offset + len(complete.encode())


def resume_conflicts(spec: JobSpec, run_dir: Path) -> list[str]:
    """Fields that differ between `spec` and the spec the run's newest checkpoint was written with,
    outside the allow-list `resume_guard.RESUME_MAY_CHANGE` (steps, cadences, tracking, resources
    and layouts that reshard)."""
    from shardyard.runtime.resume_guard import spec_differences

    latest = find_latest_checkpoint(run_dir)
    if latest is None:
        return []
    stored_file = latest / SPEC_FILE if (latest / SPEC_FILE).exists() else RunDir(run_dir).spec_file
    if not stored_file.exists():
        return []
    return spec_differences(load_spec(stored_file), spec)


def refuse_conflicting_resume(spec: JobSpec, run_dir: Path) -> None:
    """Raise UserError when `run_dir` holds checkpoints of a different job (see `resume_conflicts`)."""
    conflicts = resume_conflicts(spec, run_dir)
    if conflicts:
        raise UserError(
            f"{run_dir} holds checkpoints written with a different spec; a resume may change only "
            f"steps, cadences, tracking, checkpointing and resources, but these differ: "
            f"{'; '.join(conflicts)}. The checkpoints are left untouched: undo those changes to "
            "resume, or give this job another name (--set name=...) to start fresh"
        )


def latest_step(run_dir: Path) -> int:
    """Step of the run's newest complete checkpoint (0 when it has none)."""
    latest = find_latest_checkpoint(run_dir)
    return 0 if latest is None else int(read_meta(latest)["step"])
