"""Checkpoint saves that never end the job and, with `checkpoint.async`, never hold the step for the write.

A save goes through these stages; every rank runs them at the same steps:

    start (main thread)    this rank's RNG, meta.json (rank 0) and the state into a local staging
                           directory: synchronous saves write the state there in a thread of their
                           own; asynchronous ones copy it to CPU memory (DCP's staging: the only part
                           the step waits for) and DCP writes it from its own thread
    write (background)     the staged files are copied into the stored checkpoint directory
                           (`<run>/checkpoint_<step>`, on the run's filesystem or object store) and
                           fsynced; this rank's file digests are the result
    finish (main thread)   one all_gather: every rank's outcome and digests. All good: rank 0 writes
                           the manifest (the commit marker) and says whether that worked; every rank
                           reports the stored directory. Any failure: one line naming the cause, the
                           rank and the step, the partial directory removed, the report made without
                           a checkpoint, training goes on; `checkpoint.max_failed_saves` failures in a
                           row stop the job (SaveFailures, a user error: retrying would fail the same)

A synchronous save waits for its write (at most `checkpoint.save_timeout_s`) right after starting it;
an asynchronous one is polled at every step boundary (one 2-float all_reduce) and finished when every
rank's write is done; the next save, the end of training and a graceful stop wait for it first. The
state's writes run on a gloo process group of the writer's own, so they never interleave with the
training's collectives. A write that timed out keeps its thread (Python cannot stop one): the next
save waits for it, or counts as failed while it still runs, and the late write removes what it left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import CHECKPOINT_PREFIX
from shardyard.platform.schema import CheckpointSpec
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.save_guard import BestNotKept, fsync_path, keep_best


class SaveFailures(UserError):
    """`checkpoint.max_failed_saves` saves in a row failed: the job stops on its last good checkpoint."""


class CheckpointStore:
    """Where a run's checkpoints are stored: a local or shared directory, or a pyarrow filesystem
    (object storage) and a path in it. `checkpoint_<step>` directories are its children."""

    def __init__(self, root: str, filesystem: Any = None) -> None:
        import pyarrow.fs

        self.root = root
        self.filesystem = filesystem
        self.local = filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem)

    def path(self, step: int) -> str:
        return f"{self.root.rstrip('/')}/{CHECKPOINT_PREFIX}{step:08d}"

    def free_bytes(self) -> int | None:
        """Free space where checkpoints go, when the filesystem can say (object stores cannot)."""
        if not self.local:
            return None
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def copy_in(self, staged: Path, target: str) -> None:
        """Copy this rank's staged files into `target` (other ranks add theirs), durably."""
        if not self.local:
            import pyarrow.fs

            pyarrow.fs.copy_files(str(staged), target, destination_filesystem=self.filesystem)
            return
        folders = {Path(target)}
        for source in sorted(p for p in staged.rglob("*") if p.is_file()):
            destination = Path(target) / source.relative_to(staged)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            fsync_path(destination)
            folders.add(destination.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_path(folder)
        fsync_path(Path(target).parent)

    def write_manifest(self, target: str, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1).encode()
        if not self.local:
            with self.filesystem.open_output_stream(f"{target}/{ckpt.MANIFEST_FILE}") as out:
                out.write(text)
            return
        tmp = Path(target) / f".{ckpt.MANIFEST_FILE}.tmp"
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(target) / ckpt.MANIFEST_FILE)
        fsync_path(Path(target))

    def remove(self, target: str) -> None:
        if self.local:
            shutil.rmtree(target, ignore_errors=True)
            return
        try:
            self.filesystem.delete_dir(target)
        except (OSError, FileNotFoundError):
            pass


class Reporter(Protocol):
    """Where finished checkpoints are registered: Ray Train (runtime.worker.RayReporter) or, without
    Ray, a local rotation (runtime.worker.LocalReporter). Every rank calls it at the same steps."""

    store: CheckpointStore

    def __call__(self, metrics: dict[str, Any], stored: str | None) -> None: ...


@dataclass
class _Save:
    """One save on its way: this rank's part."""

    step: int
    metrics: dict[str, Any]
    staging: tempfile.TemporaryDirectory
    staged: Path
    target: str
    write: Future
    started: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)


class _OtherRank(RuntimeError):
    """This rank's save stopped because another rank's failed (the line names that rank's cause)."""

    PREFIX = "another"

    def __str__(self) -> str:
        return self.args[0]


def _cause(err: BaseException) -> str:
    """One line: an OSError's reason and the file it met (the stored copy's, where there are two)."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename2 or err.filename
        return f"{err.strerror} ({where})" if where else err.strerror
    if isinstance(err, _OtherRank):
        return str(err)
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text.splitlines()[0][:300]


class CheckpointWriter:
    """Starts, polls and finishes the job's saves (see the module docstring). Collective methods are
    called by every rank at the same steps."""

    def __init__(
        self,
        spec: CheckpointSpec,
        state: Any,  # runtime.parallel.state.TrainingState
        reporter: Reporter,
        run_dir: Path,
        group: dist.ProcessGroup,
        estimate_bytes: Callable[[], int],
    ) -> None:
        """`group`: the job's world (the dims' "world" group), over which the ranks agree."""
        self.spec, self.state, self.reporter, self.run_dir = spec, state, reporter, run_dir
        self.world_group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.estimate_bytes = estimate_bytes
        self.background = spec.async_
        # A process group of the writer's own: the state's collectives may then run in a thread.
        self.group = (
            dist.new_group(dist.get_process_group_ranks(group), backend="gloo") if state.threaded_save else None
        )
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardyard-save")
        self.pending: _Save | None = None
        self.late: _Save | None = None  # a timed-out write whose thread still runs
        self.failed_in_a_row = 0
        self.last_size: int | None = None  # bytes of the last stored checkpoint (all ranks)

    # ------------------------------------------------------------------ start
    def save(self, step: int, meta: dict[str, Any], texts: dict[str, str], metrics: dict[str, Any]) -> None:
        """Collective: start the save of `step`; a synchronous save also finishes here."""
        if self.pending is not None:
            self.wait()
        if self.late is not None and self.late.write.done():
            self.late = None
        self._warn_if_short_of_space(step)
        store = self.reporter.store
        target = store.path(step)
        if self.rank == 0:
            store.remove(target)  # what an earlier attempt left of this step (no manifest: never resumed)
        staging = tempfile.TemporaryDirectory(prefix="shardyard-ckpt-")
        staged = Path(staging.name) / f"step_{step:08d}"
        write: Future
        try:
            if self.late is not None and not self.late.write.done():
                raise RuntimeError(
                    f"the save of step {self.late.step} is still writing, {time.monotonic() - self.late.started:.0f} s "
                    "after it started (a stalled filesystem?)"
                )
            staged.mkdir(parents=True)
            ckpt.write_rank_files(staged, meta, texts)
            ready = True
        except Exception as err:  # noqa: BLE001 - any failure to start is this save's failure
            ready, write = False, Future()
            write.set_exception(err)
        # The state's write is collective: every rank starts it, or none does.
        if self._all(ready):
            write = self._start_write(staged, target, step)
        elif ready:
            write = Future()
            write.set_exception(_OtherRank("another rank could not start this save"))
        self.pending = _Save(step, metrics, staging, staged, target, write)
        if not self.background:
            self.wait()

    def _all(self, flag: bool) -> bool:
        """Collective: whether `flag` holds on every rank."""
        value = torch.tensor([float(not flag)], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.world_group)
        return value.item() == 0

    def _start_write(self, staged: Path, target: str, step: int) -> Future:
        write: Future
        try:
            if self.background:
                written = self.state.save_async(staged, self.group)  # the step waits for the CPU copy only
                write = self.pool.submit(self._store, staged, target, step, written)
            elif self.state.threaded_save:
                write = self.pool.submit(self._write_and_store, staged, target, step)
            else:  # a backend whose collectives run on the training's own group: in this thread
                self.state.save(staged)
                write = self.pool.submit(self._store, staged, target, step, None)
        except Exception as err:  # noqa: BLE001 - the CPU copy's or a backend's own write's failure
            write = Future()
            write.set_exception(err)
        return write

    def _write_and_store(self, staged: Path, target: str, step: int) -> dict[str, list]:
        self.state.save(staged, self.group)
        return self._store(staged, target, step, None)

    def _store(self, staged: Path, target: str, step: int, written: Future | None) -> dict[str, list]:
        """Background: wait for the state's own write, copy this rank's files into the store."""
        if written is not None:
            written.result()
        digests = ckpt.file_digests(staged)
        ckpt.maybe_stall_save(step)  # test hook: a stalled filesystem
        self.reporter.store.copy_in(staged, target)
        ckpt.maybe_die_mid_save(step)  # test hook: a kill after this rank's files are stored
        return digests

    # ------------------------------------------------------------------ poll and finish
    def poll(self) -> None:
        """Collective, at every step boundary while a save is on its way: finish it when every rank's
        write is done, fail it when one ran past checkpoint.save_timeout_s."""
        if self.pending is None:
            return
        flags = torch.tensor(
            [float(not self.pending.write.done()), float(self._overdue(self.pending))], dtype=torch.float32
        )
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.world_group)
        if flags[1] > 0 or flags[0] == 0:
            self._finish(timed_out=bool(flags[1] > 0))

    def wait(self) -> None:
        """Collective: wait for the save on its way (at most until its timeout), then finish it."""
        if self.pending is None:
            return
        remaining = self.spec.save_timeout_s - (time.monotonic() - self.pending.started)
        try:
            self.pending.write.exception(timeout=max(0.0, remaining))
        except TimeoutError:
            pass
        overdue = torch.tensor([float(not self.pending.write.done())], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(overdue, op=dist.ReduceOp.MAX, group=self.world_group)
        self._finish(timed_out=bool(overdue[0] > 0))

    def close(self) -> None:
        """Collective: the end of training, a graceful stop or a planned resize: the save on its way
        is finished first. The writer stays usable (its thread deletes staged files meanwhile)."""
        self.wait()

    def _overdue(self, save: _Save) -> bool:
        return not save.write.done() and time.monotonic() - save.started > self.spec.save_timeout_s

    def _finish(self, timed_out: bool) -> None:
        save, self.pending = self.pending, None
        assert save is not None
        problem: str | None = None
        digests: dict[str, list] = {}
        if timed_out and not save.write.done():
            problem = f"still writing after checkpoint.save_timeout_s ({self.spec.save_timeout_s:g} s)"
        elif timed_out:
            problem = f"{_OtherRank.PREFIX} rank's write ran past checkpoint.save_timeout_s"
        else:
            err = save.write.exception()
            if err is not None:
                problem = _cause(err)
            else:
                digests = save.write.result()
        outcomes: list[Any] = [(problem, digests)]
        if self.world > 1:
            outcomes = [None] * self.world
            dist.all_gather_object(
                outcomes, (problem, digests), group=self.world_group
            )  # outcomes, file names and hashes: never tensors
        # the rank with the cause first, before the ranks that stopped because of it
        failed = sorted(
            ((rank, p) for rank, (p, _) in enumerate(outcomes) if p is not None),
            key=lambda item: (item[1].startswith(_OtherRank.PREFIX), item[0]),
        )
        if not failed:
            manifest = {name: entry for _, files in outcomes for name, entry in files.items()}
            verdict: list[str | None] = [None]
            if self.rank == 0:
                try:
                    self.reporter.store.write_manifest(save.target, {"files": manifest})
                except Exception as err:  # noqa: BLE001 - the commit marker's failure is the save's
                    verdict = [_cause(err)]
            if self.world > 1:
                dist.broadcast_object_list(verdict, group=self.world_group, group_src=0)
            if verdict[0] is not None:
                failed = [(0, f"writing the manifest: {verdict[0]}")]
            else:
                self.last_size = sum(int(size) for size, _ in manifest.values())
        if failed:
            self._failed(save, failed)
        else:
            self.failed_in_a_row = 0
            self.reporter(save.metrics, save.target)
            if self.spec.keep_best and "val_bpb" in save.metrics:
                self._keep_best(save, {"files": manifest})
        if save.write.done():
            self.pool.submit(save.staging.cleanup)  # deleting the staged files is the pool's work too
        else:  # a timed-out write: it cleans up after itself when it ends
            self.late = save
            save.abandoned.set()
            save.write.add_done_callback(lambda _: self._clean_late(save))

    def _keep_best(self, save: _Save, manifest: dict) -> None:
        """Collective: copy the stored checkpoint's staged files to `<run>/best` when it has the lowest
        held-out bpb so far. A copy that fails is one line; the checkpoint itself is stored, so it does
        not count among the failed saves, and the previous best stays."""
        val_bpb = float(save.metrics["val_bpb"])
        try:
            keep_best(self.run_dir, save.staged, val_bpb, save.step, self.world_group, manifest)
        except BestNotKept as err:
            if self.rank == 0:
                print(
                    f"[shardyard] keeping the checkpoint of step {save.step} as the best (val bpb {val_bpb:.4f}) "
                    f"failed on {err}; the previous best stays and training goes on",
                    flush=True,
                )

    def _clean_late(self, save: _Save) -> None:
        self.reporter.store.remove(save.target)
        save.staging.cleanup()

    def _failed(self, save: _Save, failed: list[tuple[int, str]]) -> None:
        self.failed_in_a_row += 1
        if self.rank == 0:
            self.reporter.store.remove(save.target)  # the partial directory: no manifest, never resumed
        rank, cause = failed[0]
        where = f"rank {rank}" if self.world > 1 else "this worker"
        line = f"checkpoint of step {save.step} failed on {where}: {cause}"
        self.reporter(save.metrics, None)  # every rank reports, with or without a checkpoint
        if self.failed_in_a_row >= self.spec.max_failed_saves:
            raise SaveFailures(
                f"{line}; {self.failed_in_a_row} saves failed in a row (checkpoint.max_failed_saves: "
                f"{self.spec.max_failed_saves}): the job stops. Its newest complete checkpoint is kept; free space "
                "or fix the storage (checkpoint.dir), then run the same spec again to resume"
            )
        if self.rank == 0:
            print(
                f"[shardyard] {line}; its partial directory was removed and training goes on (failed saves in a "
                f"row: {self.failed_in_a_row} of checkpoint.max_failed_saves {self.spec.max_failed_saves})",
                flush=True,
            )

    # ------------------------------------------------------------------ space
    def _warn_if_short_of_space(self, step: int) -> None:
        """Rank 0: a warning when the store (or the local staging directory) has less free space than a
        checkpoint takes: the last one's size, or before the first the state's bytes times the world."""
        if self.rank != 0:
            return
        need = self.last_size if self.last_size is not None else self.estimate_bytes() * self.world
        for where, free in (
            ("checkpoint.dir", self.reporter.store.free_bytes()),
            (f"the staging directory {tempfile.gettempdir()}", _free(tempfile.gettempdir())),
        ):
            if free is not None and free < need:
                print(
                    f"[shardyard] warning: step {step}: {where} has {free / 2**20:.1f} MiB free, a checkpoint "
                    f"takes about {need / 2**20:.1f} MiB: this save will likely fail (training goes on if it does)",
                    flush=True,
                )


def _free(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors this rank holds in the model and the optimizer (a checkpoint's share)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t  # DTensor shards (FSDP2)

    total = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for entry in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))
    return total
