"""Checkpoint saves that never stop the step and never end the job (runtime/saving.py), and an
embedded cluster that never outlives its driver (cluster/orphans.py). Real DCP, real gloo process
groups, a real full filesystem (a small tmpfs), a real SIGKILL of a real `shardyard run` driver."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardyard import envvars
from shardyard.cluster.orphans import start_time
from shardyard.comm.launch import spawn
from shardyard.platform.spec import load_spec_text, spec_from_json
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.saving import SaveFailures
from shardyard.runtime.worker import LocalReporter, Trainer
from shardyard.tracking.logger import read_metrics
from tests.helpers import ROOT, SHARDYARD, assert_same_series, tiny_spec_yaml, train_grad_norms, train_losses

MODEL = "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2}}"


def job(storage: Path, name: str, steps: int, every: int, world: int = 1, **overrides: str):
    text = tiny_spec_yaml(
        name,
        storage,
        model=MODEL,
        training=f"{{steps: {steps}, batch_size: 4, eval_every: 0, eval_bytes: 2048, log_every: 1}}",
        resources=f"{{workers: {world}, cpus_per_worker: 1, max_failures: 0}}",
        checkpoint=f"{{dir: {storage}, every: {every}, keep: 2}}",
        tracking="{mode: disabled}",
    )
    return load_spec_text(text, overrides=[f"{k}={v}" for k, v in overrides.items()])


# ------------------------------------------------------------------------------ async = sync
def _sync_then_async(topology, sync_json: str, async_json: str, root: str) -> None:
    os.environ.update(RANK=str(topology.rank), WORLD_SIZE=str(topology.world_size), LOCAL_RANK=str(topology.rank))
    for text in (sync_json, async_json):
        spec = spec_from_json(text)
        run_dir = Path(root) / spec.name
        Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep)).fit()


def _tensors(checkpoint: Path, out: Path) -> dict:
    """Every tensor of a stored checkpoint (model and optimizer, all ranks' shards), read back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / ckpt.SHARDS_DIR, out)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_async_saves_train_and_store_what_synchronous_saves_do(tmp_path: Path) -> None:
    """2 gloo ranks, experts sharded over EP 2 and the rest over FSDP2: a run with checkpoint.async
    (each save written while the next steps train) has the synchronous run's losses and gradient norms,
    and every checkpoint of it holds the same tensors (model and optimizer) as the synchronous one's."""
    sync = job(tmp_path, "sync", steps=6, every=2, world=2, **{"parallel.expert_parallel": "2"})
    sync = load_spec_text(
        sync.model_dump_json(), overrides=["parallel.shard=full", "checkpoint.keep=3"]
    )  # keep all three
    asynchronous = load_spec_text(sync.model_dump_json(), overrides=["name=async", "checkpoint.async=true"])
    spawn(_sync_then_async, 2, 2, sync.model_dump_json(), asynchronous.model_dump_json(), str(tmp_path))
    assert_same_series(train_losses(tmp_path / "async"), train_losses(tmp_path / "sync"), 1e-7, "loss")
    assert_same_series(train_grad_norms(tmp_path / "async"), train_grad_norms(tmp_path / "sync"), 1e-7, "grad_norm")
    assert sorted(train_losses(tmp_path / "sync")) == list(range(1, 7))
    for step in (2, 4, 6):
        stored = {}
        for name in ("sync", "async"):
            directory = tmp_path / name / f"checkpoint_{step:08d}"
            assert ckpt.verify_checkpoint(directory, full=True) is None, (name, step)
            assert ckpt.read_meta(directory)["step"] == step
            stored[name] = _tensors(directory, tmp_path / f"{name}-{step}.pt")
        flat = {name: _flatten(value) for name, value in stored.items()}
        assert flat["sync"].keys() == flat["async"].keys() and len(flat["sync"]) > 20
        for key, value in flat["sync"].items():
            assert torch.equal(value, flat["async"][key]), (step, key)


def _flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree
    return out


# ------------------------------------------------------------------------------ a full disk
@contextlib.contextmanager
def tmpfs(directory: Path, size_kib: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real full filesystem) needs root")
    directory.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _fit(spec, run_dir: Path, store: Path, resume: Path | None = None) -> None:
    trainer = Trainer(spec, run_dir, LocalReporter(store, spec.checkpoint.keep))
    trainer.resume(resume)
    trainer.fit()


def test_saves_into_a_full_filesystem_fail_alone_and_too_many_stop_the_job(tmp_path: Path, capfd) -> None:
    """Checkpoints go to a tmpfs with room for one: the step-2 save is stored, the later ones meet
    ENOSPC. Each failure is one line and training goes on to the end with the losses of a run on a
    roomy disk; the step-2 checkpoint stays complete, and resuming from it gives the same losses
    again. With checkpoint.max_failed_saves: 2 the second failure in a row stops the job, naming it."""
    reference = job(tmp_path, "roomy", steps=8, every=2)
    _fit(reference, tmp_path / "roomy", tmp_path / "roomy")
    size = sum(p.stat().st_size for p in (tmp_path / "roomy" / "checkpoint_00000008").rglob("*") if p.is_file())
    assert size > 100_000
    want = train_losses(tmp_path / "roomy")

    with tmpfs(tmp_path / "full", size_kib=(size * 3 // 2) // 1024) as disk:
        spec = job(tmp_path, "full", steps=8, every=2, **{"checkpoint.max_failed_saves": "5"})
        capfd.readouterr()
        _fit(spec, disk, disk)  # the whole run directory on the small disk: metrics go on being written
        out = capfd.readouterr().out
        failed = [line for line in out.splitlines() if "failed on this worker" in line]
        assert len(failed) == 3, out  # steps 4, 6 and 8
        assert all("No space left on device" in line and "training goes on" in line for line in failed), failed
        assert "checkpoint.dir has" in out and "this save will likely fail" in out  # warned before, from the last size
        assert_same_series(train_losses(disk), want, 1e-7, "loss after failed saves")
        assert [p.name for p in disk.glob("checkpoint_*")] == ["checkpoint_00000002"]  # partial ones removed
        good = disk / "checkpoint_00000002"
        assert ckpt.verify_checkpoint(good, full=True) is None

        resumed = job(tmp_path, "resumed", steps=8, every=0)
        _fit(resumed, tmp_path / "resumed", tmp_path / "resumed-store", resume=good)
        got = train_losses(tmp_path / "resumed")
        assert sorted(got) == list(range(3, 9))
        assert_same_series(got, {s: want[s] for s in got}, 1e-7, "loss resumed from the last good checkpoint")

        strict = job(tmp_path, "strict", steps=8, every=2, **{"checkpoint.max_failed_saves": "2"})
        shutil.rmtree(good)  # an empty disk again: step 2 is stored, steps 4 and 6 fail
        with pytest.raises(
            SaveFailures,
            match=r"checkpoint of step 6 failed on this worker: No space left on device .*2 saves failed in a row "
            r".*newest complete checkpoint is kept",
        ):
            _fit(strict, tmp_path / "strict", disk)
        assert max(train_losses(tmp_path / "strict")) == 6
        assert ckpt.find_latest_checkpoint(disk) == good and ckpt.verify_checkpoint(good, full=True) is None


def test_keeping_the_best_on_a_full_disk_is_one_line_and_training_goes_on(tmp_path: Path, capfd) -> None:
    """The run directory on a tmpfs with room for one checkpoint: the step-2 save is stored, copying
    it to `best` meets ENOSPC. That is one line naming the step and the cause, no `best` or partial copy
    is left, the stored checkpoint stays complete and training goes on with the losses of a roomy run."""
    best = {"training.eval_every": "2", "checkpoint.keep_best": "true", "checkpoint.max_failed_saves": "5"}
    reference = job(tmp_path, "roomy", steps=4, every=2, **best)
    _fit(reference, tmp_path / "roomy", tmp_path / "roomy")
    assert ckpt.verify_checkpoint(tmp_path / "roomy" / "best", full=True) is None  # kept where there is room
    size = sum(p.stat().st_size for p in (tmp_path / "roomy" / "checkpoint_00000002").rglob("*") if p.is_file())

    with tmpfs(tmp_path / "full", size_kib=(size * 3 // 2) // 1024) as disk:
        capfd.readouterr()
        _fit(job(tmp_path, "full", steps=4, every=2, **best), disk, disk)
        out = capfd.readouterr().out
        lines = [line for line in out.splitlines() if "as the best" in line]
        assert len(lines) == 1 and "step 2" in lines[0] and "No space left on device" in lines[0], out
        assert "training goes on" in lines[0] and "previous best stays" in lines[0]
        assert not (disk / "best").exists() and not (disk / ".best.partial").exists()
        assert ckpt.verify_checkpoint(disk / "checkpoint_00000002", full=True) is None
        assert_same_series(train_losses(disk), train_losses(tmp_path / "roomy"), 1e-7, "loss after a failed best copy")


def _keep_best_twice(topology: Any, disk: str, staged_root: str, results: str) -> None:
    """Rank r: keep a small checkpoint as the best (val 0.9), then one whose rank-1 file cannot fit."""
    from shardyard.runtime.save_guard import BestNotKept, keep_best

    group = dist.group.WORLD
    small, big = Path(staged_root) / "small", Path(staged_root) / "big"
    manifest = {"files": {**ckpt.file_digests(small / "0"), **ckpt.file_digests(small / "1")}}
    kept = keep_best(Path(disk), small / str(topology.rank), 0.9, 1, group, manifest)
    try:
        keep_best(Path(disk), big / str(topology.rank), 0.5, 2, group, {"files": {}})
        outcome = "kept"
    except BestNotKept as err:
        outcome = str(err)
    Path(results, f"rank{topology.rank}.json").write_text(json.dumps([kept, outcome]))


def test_a_best_copy_that_fails_on_a_rank_fails_on_every_rank_and_keeps_the_previous_best(tmp_path: Path) -> None:
    """2 gloo ranks copy their files into one tmpfs; rank 1's file of the second checkpoint is larger
    than the free space. Both ranks learn the same failing rank and cause (none waits forever in a
    collective), the partial copy is removed and `best` is still the first checkpoint, complete."""
    staged, results = tmp_path / "staged", tmp_path / "results"
    for rank in (0, 1):
        (staged / "small" / str(rank)).mkdir(parents=True)
        (staged / "small" / str(rank) / f"shard{rank}.bin").write_bytes(bytes(1000))
        (staged / "big" / str(rank)).mkdir(parents=True)
        (staged / "big" / str(rank) / f"shard{rank}.bin").write_bytes(bytes(1000 if rank == 0 else 600_000))
    results.mkdir()
    with tmpfs(tmp_path / "disk", size_kib=256) as disk:
        spawn(_keep_best_twice, 2, 2, str(disk), str(staged), str(results))
        outcomes = [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        assert outcomes[0] == outcomes[1], outcomes
        kept, failure = outcomes[0]
        # rank 1's file fills the disk; rank 0's, written at the same time, may meet the full disk too
        assert kept is True and failure.startswith(("rank 1: ", "rank 0: ")), failure
        assert "No space left on device" in failure, failure
        assert not (disk / ".best.partial").exists()
        assert ckpt.verify_checkpoint(disk / "best", full=True) is None
        assert json.loads((disk / "best" / "best.json").read_text()) == {"step": 1, "val_bpb": 0.9}


def test_a_save_past_its_timeout_fails_alone_and_its_late_write_removes_what_it_left(
    tmp_path: Path, capfd, monkeypatch
) -> None:
    """The step-2 save's write hangs 5 s (a stalled filesystem) under checkpoint.save_timeout_s 0.5:
    the step waits 0.5 s, the save fails with one line and training goes on with the losses of a run
    without the stall. The step-4 save meets the step-2 write still running and fails naming it; the
    late write, when it ends, removes its partial directory: nothing incomplete is left to resume."""
    reference = job(tmp_path, "prompt", steps=4, every=2)
    _fit(reference, tmp_path / "prompt", tmp_path / "prompt")
    monkeypatch.setenv(envvars.STALL_IN_SAVE, "2:5")
    spec = job(tmp_path, "stalled", steps=4, every=2, **{"checkpoint.save_timeout_s": "0.5"})
    capfd.readouterr()
    started = time.monotonic()
    trainer = Trainer(spec, tmp_path / "stalled", LocalReporter(tmp_path / "stalled", spec.checkpoint.keep))
    trainer.fit()
    took = time.monotonic() - started
    failed = [line for line in capfd.readouterr().out.splitlines() if "failed on this worker" in line]
    assert len(failed) == 2, failed
    assert "checkpoint of step 2" in failed[0] and "still writing after checkpoint.save_timeout_s (0.5 s)" in failed[0]
    assert "checkpoint of step 4" in failed[1] and "the save of step 2 is still writing" in failed[1]
    assert all("training goes on" in line for line in failed), failed
    assert took < 5, f"the run waited for the stalled write ({took:.1f} s)"
    assert_same_series(train_losses(tmp_path / "stalled"), train_losses(tmp_path / "prompt"), 1e-7, "loss")
    late = trainer.writer.late
    assert late is not None and late.step == 2 and not late.write.done()
    late.write.result(timeout=60)  # the stalled write ends: it stores its files, then removes them
    deadline = time.time() + 30
    while list((tmp_path / "stalled").glob("checkpoint_*")) and time.time() < deadline:
        time.sleep(0.05)
    assert not list((tmp_path / "stalled").glob("checkpoint_*")), "the late write left its directory"
    assert ckpt.find_latest_checkpoint(tmp_path / "stalled") is None


def _fill(disk: Path) -> Path:
    """Write zeros into `disk` until it is full; the filler file, to delete to make room again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    return filler


def test_the_lease_heartbeat_and_driver_log_degrade_to_one_warning_on_a_full_disk(
    tmp_path: Path, capfd, monkeypatch
) -> None:
    """On a full tmpfs the run lease's heartbeat thread and driver.log each say once that they cannot
    write and go on (no traceback, no dead thread); the lease keeps its last heartbeat, which renews
    once there is room again, and the lease is released as usual."""
    from shardyard.runtime import run_lease
    from shardyard.runtime.failures import DriverLog

    monkeypatch.setattr(run_lease, "HEARTBEAT_S", 0.05)  # read by the heartbeat loop at every wait
    crashed: list = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    with tmpfs(tmp_path / "disk", size_kib=64) as disk:
        run = disk / "run"
        lease = run_lease.acquire(run)
        log = DriverLog(run)
        filler = _fill(disk)
        capfd.readouterr()
        before = run_lease.read_lease(run)["heartbeat"]
        time.sleep(0.5)  # ~10 beats on a full disk
        for line in ("one\n", "two\n", "three\n"):
            log.write(line)
        out = capfd.readouterr().out
        assert out.count("cannot renew the run's lease") == 1 and "No space left on device" in out, out
        assert out.count(f"cannot write {log.path}") == 1, out
        assert run_lease.read_lease(run)["heartbeat"] == before  # the last good heartbeat stays
        assert not list(run.glob(".lease.*.tmp"))
        filler.unlink()
        deadline = time.time() + 10
        while run_lease.read_lease(run)["heartbeat"] == before and time.time() < deadline:
            time.sleep(0.05)
        assert run_lease.read_lease(run)["heartbeat"] > before, "the heartbeat did not renew once there was room"
        log.write("four\n")
        assert log.path.read_text() == "four\n"
        lease.release()
        assert run_lease.read_lease(run) is None
    assert not crashed and "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------------------ a killed driver
def _session_processes(ray_tmp: Path) -> list[int]:
    """Pids of the processes started under this Ray temp dir (RAY_TMPDIR in their environment)."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"), default=0)


def test_the_watcher_ends_every_marked_process_once_its_driver_dies() -> None:
    """cluster/orphans.py on its own: processes carrying the cluster's mark in their environment,
    each in a session of its own (as Ray's agents and workers outlive a killed driver), are left alone
    while the driver lives and SIGKILLed once it is killed; an unmarked process is never touched."""
    cluster_id = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    driver = subprocess.Popen(sleeper)
    marked = [
        subprocess.Popen(sleeper, env={**os.environ, envvars.CLUSTER_ID: cluster_id}, start_new_session=True)
        for _ in range(3)
    ]
    unmarked = subprocess.Popen(sleeper, start_new_session=True)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "shardyard.cluster.orphans", str(driver.pid), str(start_time(driver.pid)), cluster_id],
        cwd=ROOT,
    )
    try:
        time.sleep(1.5)
        assert watcher.poll() is None and all(p.poll() is None for p in marked)  # the driver lives
        driver.kill()
        driver.wait()
        assert watcher.wait(timeout=60) == 0
        assert [p.wait(timeout=10) for p in marked] == [-signal.SIGKILL] * 3
        assert unmarked.poll() is None
    finally:
        for process in (driver, watcher, unmarked, *marked):
            process.kill()
            process.wait()


def test_a_worker_whose_driver_is_gone_stops_before_writing(tmp_path: Path) -> None:
    """runtime/run_lease.DriverWatch: a worker on the host of the run lease's holder exits (status 79)
    before its next write once that process is gone, and goes on while it lives."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    worker = (
        "import sys; from pathlib import Path; from shardyard.runtime.run_lease import DriverWatch; "
        "DriverWatch(Path(sys.argv[1])).exit_if_gone(7); Path(sys.argv[2]).write_text('step 8')"
    )
    for holder, status in ((gone.pid, 79), (os.getpid(), 0)):
        lease = {"pid": holder, "host": socket.gethostname(), "owner": "o", "started": 0.0, "heartbeat": time.time()}
        (tmp_path / ".lease").write_text(json.dumps(lease))
        written = tmp_path / f"written-{holder}"
        done = subprocess.run(
            [sys.executable, "-c", worker, str(tmp_path), str(written)], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == status, done.stdout + done.stderr
        assert written.exists() == (status == 0)
        if status:
            assert f"the driver (pid {holder}) is gone: this worker stops at step 7" in done.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_killed_with_sigkill_leaves_no_cluster_and_no_further_step(tmp_path: Path) -> None:
    """`shardyard run` (its own embedded cluster, under a Ray temp dir of this test) is SIGKILLed while
    it trains: within 30 s no process of that Ray session is left (found by the temp dir in their
    environment, so nothing else running on the machine matters), and the run directory got no step
    and no complete checkpoint after the step in flight when the driver died."""
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="sy-", dir="/tmp"))  # short: Ray's socket paths live under it
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "orphans",
            tmp_path / "runs",
            training="{steps: 2000, batch_size: 4, eval_every: 0, eval_bytes: 2048, log_every: 1}",
            resources="{workers: 1, cpus_per_worker: 1, max_failures: 0}",
            checkpoint=f"{{dir: {tmp_path / 'runs'}, every: 3, keep: 2}}",
            tracking="{mode: disabled}",
        )
    )
    run_dir = tmp_path / "runs" / "orphans"
    log = open(tmp_path / "driver.out", "w")
    driver = subprocess.Popen(
        [*SHARDYARD, "run", str(spec)],
        cwd=ROOT,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while _last_step(run_dir) < 4:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.out").read_text()[-3000:]
            time.sleep(0.5)
        assert _session_processes(ray_tmp)  # the cluster runs under the temp dir given
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        at_kill = _last_step(run_dir)
        gone_by = time.monotonic() + 30  # the watcher polls every 0.5 s; room for a loaded machine
        while _session_processes(ray_tmp) and time.monotonic() < gone_by:
            time.sleep(0.5)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in _session_processes(ray_tmp)}
        out = (tmp_path / "driver.out").read_text()[-2000:]
        assert not left, f"30 s after the driver's SIGKILL these processes of its cluster remain: {left}\n{out}"
        # nothing after the step in flight when the driver died: no step logged, no checkpoint completed
        assert _last_step(run_dir) <= at_kill + 1, (at_kill, _last_step(run_dir), out)
        complete = [
            step for step, path in ckpt.checkpoints_newest_first(run_dir) if ckpt.verify_checkpoint(path) is None
        ]
        assert complete and max(complete) <= at_kill + 1, (at_kill, complete, out)
    finally:
        for pid in _session_processes(ray_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
