"""A run's directory and its layout: the one place that names where a run keeps its files.

`<checkpoint.dir>/<name>` holds everything a run writes: the spec it started with and every spec it
was started with, metrics, wandb's offline runs, the expert-load side file, events, the stop request,
the driver's lease and log, the report page and the checkpoints (Ray Train's `checkpoint_*`
directories, plus `best/`). With checkpoint.dir on object storage (s3://...) the checkpoints go to
`<checkpoint.dir>/<name>` in the bucket and a local directory under ~/.cache/shardyard/runs keeps the
rest. Local and remote locations are told apart by `locations.is_remote` alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.schema import JobSpec


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, spec: JobSpec) -> RunDir:
        """The run directory of `spec`: <checkpoint.dir>/<name>, a relative checkpoint.dir taken from
        the working directory; for a remote checkpoint.dir, a local directory named after it."""
        if is_remote(spec.checkpoint.dir):
            digest = hashlib.sha1(spec.checkpoint.dir.encode()).hexdigest()[:12]
            return cls(Path.home() / ".cache" / "shardyard" / "runs" / digest / spec.name)
        return cls(local_path(spec.checkpoint.dir).absolute() / spec.name)

    @classmethod
    def find(cls, name: str) -> RunDir | None:
        """`name` as a run directory (it holds a spec file), or ./runs/<name>; None when neither is one."""
        for candidate in (cls(Path(name)), cls(Path("runs") / name)):
            if candidate.spec_file.is_file():
                return cls(candidate.path.resolve())
        return None

    @staticmethod
    def checkpoint_storage(spec: JobSpec, run_dir: Path) -> tuple[str, str]:
        """(Ray Train RunConfig name, storage_path) that put the checkpoints into `run_dir` itself
        (whatever the job is called: `submit --run-dir`), or into the bucket for a remote checkpoint.dir."""
        if is_remote(spec.checkpoint.dir):
            return spec.name, spec.checkpoint.dir
        return run_dir.name, str(run_dir.parent)

    # ---------------------------------------------------------------------------------- the layout
    @property
    def spec_file(self) -> Path:
        """The spec of the newest start (a checkpoint directory holds its own copy under this name)."""
        return self.path / SPEC_FILE

    @property
    def spec_history(self) -> Path:
        """spec-history/NNNN.yaml: every spec the run was started with."""
        return self.path / "spec-history"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def run_info(self) -> Path:
        return self.path / "run_info.json"

    @property
    def wandb(self) -> Path:
        """wandb's offline runs, one per start."""
        return self.path / "wandb"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id"

    @property
    def expert_load(self) -> Path:
        return self.path / "expert_load.bin"

    @property
    def expert_load_index(self) -> Path:
        return self.path / "expert_load.json"

    @property
    def heartbeats(self) -> Path:
        """One heartbeat file per rank (runtime/watchdog.py)."""
        return self.path / "heartbeats"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def stop_request(self) -> Path:
        return self.path / "STOP"

    @property
    def resize_request(self) -> Path:
        """An elastic group's controller asks for a checkpoint before it resizes the group."""
        return self.path / "RESIZE"

    @property
    def resize_ready(self) -> Path:
        """Rank 0: the checkpoint of the agreed boundary is reported (its step); the group holds."""
        return self.path / "RESIZE_READY"

    @property
    def lease(self) -> Path:
        return self.path / ".lease"

    @property
    def driver_log(self) -> Path:
        return self.path / "driver.log"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def checkpoint(self, step: int) -> Path:
        """Where the checkpoint of `step` is committed (the name Ray Train's own checkpoints sort with)."""
        return self.path / f"{CHECKPOINT_PREFIX}{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Every checkpoint_* directory, complete or not, in no particular order."""
        return list(self.path.glob(f"{CHECKPOINT_PREFIX}*"))

    @property
    def best(self) -> Path:
        """The checkpoint with the lowest held-out bpb so far (checkpoint.keep_best)."""
        return self.path / "best"


SPEC_FILE = "spec.yaml"
CHECKPOINT_PREFIX = "checkpoint_"
