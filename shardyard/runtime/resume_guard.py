"""What a resumed run may change, the corpus it must still read, and the specs it has used.

- `spec_differences(old, new)`: every field that differs outside `RESUME_MAY_CHANGE`, an explicit
  allow-list (how long and how often to train, evaluate, checkpoint and log; tracking; resources and
  layouts that reshard on load; exact kernels). Everything else (data selection and order, batch
  size, optimizer hyper-parameters, model, precision, seed, ...) changes what the checkpoint means
  or is silently ignored, so a resume with such a change is refused, naming the fields.
- `check_corpus_on_every_rank(stored, mine, checkpoint, group)`: the corpus fingerprint a checkpoint was
  written with (the training data's `fingerprint`: file list hash, byte counts, window count) against
  this rank's, agreed over the ranks of `group`.
- `record_spec_history(run_dir, spec)`: spec-history/0001.yaml, 0002.yaml, ... one file per
  distinct spec a run was started with, created exclusively, never overwritten.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import JobSpec

# Dotted field paths (fnmatch patterns; list indices appear as numbers) a resume may change.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "training.steps",
    "training.eval_every",
    "training.eval_bytes",
    "training.eval_sets",
    "training.eval_sets.*",
    "training.log_every",
    "training.activation_checkpointing",
    "training.activation_checkpointing_every",
    "checkpoint.*",
    "tracking.*",
    "env",
    "env.*",
    "resources.*",  # workers, CPUs/GPUs, failures, memory: checkpoints reshard (where their format allows)
    "parallel.expert_parallel",
    "parallel.shard",
    "parallel.a2a",
    "model.moe.backend",
    "model.stages.*.moe.backend",
    "model.stages.*.checkpoint_chunks",
    "data.cache_dir",
    "data.prepared_dir",  # where data is cached / prepared (the corpus fingerprint guards content)
)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, child in enumerate(value):
            _flatten(child, f"{prefix}.{i}", out)
        out[f"{prefix}.#"] = len(value)
    else:
        out[prefix] = value
    return out


def _allowed(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in RESUME_MAY_CHANGE)


def spec_differences(old: JobSpec, new: JobSpec) -> list[str]:
    """'field: old -> new' for every difference a resume must refuse."""
    old_fields = _flatten(json.loads(old.model_dump_json()), "", {})
    new_fields = _flatten(json.loads(new.model_dump_json()), "", {})
    pinned = (
        ()
        if old.parallel.checkpoints_reshard and new.parallel.checkpoints_reshard
        else old.parallel.PINNED_WITHOUT_RESHARDING
    )
    out = []
    for path in sorted(set(old_fields) | set(new_fields)):
        a, b = old_fields.get(path), new_fields.get(path)
        if a == b or path == "name":
            continue
        if _allowed(path) and path not in pinned:
            continue
        out.append(f"{path.replace('.#', '')}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------- corpus
class CorpusChanged(UserError):
    """The corpus a rank sees differs from the one the checkpoint was trained on."""


def check_corpus_on_every_rank(
    stored: dict[str, Any] | None, mine: dict[str, Any], checkpoint: Path, group: dist.ProcessGroup
) -> None:
    """Collective: every rank compares its corpus fingerprint with the checkpoint's; if any rank
    differs, every rank raises CorpusChanged naming the ranks and fields (no rank is left waiting
    in a collective). A checkpoint written before fingerprints existed passes."""
    world = dist.get_world_size(group)
    problem = None
    if stored is not None:
        fields = [
            f"{k}: {stored.get(k)!r} -> {mine.get(k)!r}"
            for k in sorted(set(stored) | set(mine))
            if stored.get(k) != mine.get(k)
        ]
        problem = "; ".join(fields) or None
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem, group=group)
    bad = {rank: p for rank, p in enumerate(problems) if p}
    if bad:
        detail = "; ".join(f"rank {rank}: {p}" for rank, p in sorted(bad.items()))
        raise CorpusChanged(
            f"{checkpoint}: the corpus differs from the one this run was trained on ({detail}); "
            "resume with the same data.paths, files and data.max_bytes, or start a new run "
            "(--set name=...)"
        )


# ----------------------------------------------------------------------------------- spec history
def record_spec_history(run_dir: Path, spec_yaml: str) -> Path:
    """Append `spec_yaml` to run_dir/spec-history/NNNN.yaml unless it equals the newest entry; files
    are created exclusively (O_EXCL), so an entry is never overwritten. Returns the entry."""
    history = RunDir(Path(run_dir)).spec_history
    history.mkdir(parents=True, exist_ok=True)
    entries = sorted(p for p in history.glob("[0-9][0-9][0-9][0-9].yaml"))
    if entries and entries[-1].read_text() == spec_yaml:
        return entries[-1]
    number = int(entries[-1].stem) + 1 if entries else 1
    while True:
        path = history / f"{number:04d}.yaml"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another start took this number
            number += 1
            continue
        with os.fdopen(fd, "w") as f:
            f.write(spec_yaml)
            f.flush()
            os.fsync(f.fileno())
        return path
