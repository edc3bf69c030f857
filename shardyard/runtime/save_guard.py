"""What happens around a checkpoint save: refuse non-finite weights, keep the best one by validation
bpb (the stored copy is made durable where it is written: runtime.saving).

- `refuse_nonfinite_weights(model, step, group)` (collective over `group`): every rank checks the parameters it holds
  (its local shards); if any rank finds a NaN or Inf, every rank raises NonFiniteWeights naming the
  step and the first parameters, before anything is written, so the newest checkpoint stays the last
  good state. It is a UserError: retrying from that checkpoint would only diverge again, so the job
  stops (the failure policy treats user errors as final).
- `keep_best(run_dir, staged, val_bpb, step, group)` (collective over `group`): when `val_bpb` beats `<run_dir>/best`,
  every rank copies its staged files into `<run_dir>/.best.partial`, rank 0 writes the manifest last
  and renames the directory to `best` (the old one removed after). `best` is not a `checkpoint_*`
  directory, so neither Ray's `num_to_keep` nor resume fallback ever touch it. A copy that fails on
  any rank (a full disk) raises BestNotKept everywhere and leaves the previous best as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.runtime import checkpoint as ckpt

BEST_RECORD = "best.json"


class NonFiniteWeights(UserError):
    """The model's weights hold NaN or Inf: saving them would make the bad state the resume point."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shards (FSDP2)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, p in model.named_parameters()
        if p.device.type != "meta" and not bool(torch.isfinite(_local(p.detach())).all())
    ]


def refuse_nonfinite_weights(model: torch.nn.Module, step: int, group: dist.ProcessGroup) -> None:
    names = nonfinite_parameters(model)
    found = [names]
    if dist.get_world_size(group) > 1:
        found = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(found, names, group=group)
    bad = {rank: n for rank, n in enumerate(found) if n}
    if bad:
        rank, names = next(iter(bad.items()))
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise NonFiniteWeights(
            f"step {step}: the weights are not finite (NaN or Inf in {', '.join(names[:3])}{more} on rank {rank}); "
            f"the checkpoint of step {step} was not written and the job stops here. The newest checkpoint holds "
            "the last finite weights: lower optim.lr, raise optim.schedule.warmup or set optim.grad_clip, then "
            "resume it"
        )


# ------------------------------------------------------------------------------------ durability
def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ best
def best_val_bpb(run_dir: Path) -> float | None:
    """The val bpb of `<run_dir>/best` when it is a complete checkpoint, else None."""
    best = RunDir(Path(run_dir)).best
    try:
        value = float(json.loads((best / BEST_RECORD).read_text())["val_bpb"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if ckpt.verify_checkpoint(best, full=False) is None else None


class BestNotKept(Exception):
    """Copying a checkpoint to `<run_dir>/best` failed on some rank; the previous best is untouched."""


def keep_best(
    run_dir: Path, staged: Path, val_bpb: float, step: int, group: dist.ProcessGroup, manifest: dict | None = None
) -> bool:
    """Collective: copy the staged checkpoint to `<run_dir>/best` when `val_bpb` is the lowest so far.
    Returns whether it did (the same answer on every rank). `manifest` is the stored checkpoint's (read
    from `staged` when None). A copy that fails on any rank (a full disk, a permission) raises
    BestNotKept on every rank, naming the rank and the cause, with the partial copy removed and the
    previous best as it was: the caller reports it and training goes on."""
    rank, many = dist.get_rank(group), dist.get_world_size(group) > 1
    decision = [None]
    if rank == 0:
        previous = best_val_bpb(run_dir)
        decision = [previous is None or val_bpb < previous]
    if many:
        dist.broadcast_object_list(decision, group=group, group_src=0)
    if not decision[0]:
        return False
    partial = Path(run_dir) / ".best.partial"

    def prepare() -> None:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

    def copy() -> None:
        shutil.copytree(staged, partial, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ckpt.MANIFEST_FILE))
        fsync_tree(partial, mine=staged)

    def commit() -> None:
        if rank != 0:
            return
        (partial / BEST_RECORD).write_text(json.dumps({"step": step, "val_bpb": val_bpb}))
        files = dict((manifest or json.loads((staged / ckpt.MANIFEST_FILE).read_text()))["files"])
        files[BEST_RECORD] = ckpt.file_digests(partial)[BEST_RECORD]
        (partial / ckpt.MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))  # the commit marker, last
        fsync_tree(partial, mine=None)
        best = RunDir(Path(run_dir)).best
        old = Path(run_dir) / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(partial, best)
        fsync_path(Path(run_dir))
        shutil.rmtree(old, ignore_errors=True)

    for stage in (prepare, copy, commit):  # each stage ends with every rank knowing whether all succeeded
        failed = _first_failure(stage, group)
        if failed is not None:
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise BestNotKept(failed)
    return True


def _first_failure(stage: Callable[[], None], group: dist.ProcessGroup) -> str | None:
    """Collective: run `stage` on this rank; the first failing rank and its cause, the same on every rank."""
    try:
        stage()
        mine = None
    except shutil.Error as err:  # copytree's: one (source, target, why) per file that failed
        mine = str(err.args[0][0][2])
    except OSError as err:
        mine = str(err)
    found = [mine]
    if dist.get_world_size(group) > 1:
        found = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, mine, group=group)
    return next((f"rank {r}: {cause}" for r, cause in enumerate(found) if cause is not None), None)


def fsync_tree(directory: Path, mine: Path | None) -> None:
    """fsync the files of `directory` (only those also under `mine`, when given) and its folders."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir() or mine is None or (mine / path.relative_to(directory)).exists():
            fsync_path(path)
    fsync_path(directory)
