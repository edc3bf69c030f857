"""Resume safety: the spec allow-list, the corpus fingerprint on every rank, the spec history, one
lease per run directory, and checkpoints and metrics in one directory whatever the job's name."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardyard.comm.launch import spawn
from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec_text, spec_to_yaml
from shardyard.runtime import run_lease
from shardyard.runtime.entry import refuse_conflicting_resume, write_run_files
from shardyard.runtime.resume_guard import CorpusChanged, check_corpus_on_every_rank, spec_differences
from tests.helpers import ROOT, tiny_spec_yaml, world_of_one


def spec(*overrides: str, root: Path = Path("/tmp/unused")):
    return load_spec_text(tiny_spec_yaml("r", root), overrides=list(overrides))


def test_only_allow_listed_fields_may_change_on_resume() -> None:
    base = spec()
    allowed = spec(
        "training.steps=48",
        "training.eval_every=6",
        "training.log_every=2",
        "checkpoint.every=4",
        "checkpoint.keep=5",
        "tracking.mode=disabled",
        "resources.workers=4",
        "resources.max_failures=3",
        "parallel.shard=full",
        "data.cache_dir=/tmp/c",
    )
    assert spec_differences(base, allowed) == []
    refused = spec(
        "data.extensions=[.txt]",
        "data.max_bytes=1000",
        "data.val_fraction=0.1",
        "training.batch_size=2",
        "optim.lr=0.1",
        "optim.betas=[0.8,0.9]",
        "training.precision=bf16",
        "seed=3",
        "model.moe.top_k=1",
    )
    fields = [d.split(":")[0] for d in spec_differences(base, refused)]
    assert fields == [
        "data.extensions",
        "data.max_bytes",
        "data.val_fraction",
        "model.moe.top_k",
        "optim.betas",
        "optim.lr",
        "seed",
        "training.batch_size",
        "training.precision",
    ]
    # DeepSpeed ZeRO checkpoints do not reshard: the worker count is pinned there
    zero = spec("model.kind=dense", "model.moe=null", "parallel.zero=2")
    assert spec_differences(
        zero, spec("model.kind=dense", "model.moe=null", "parallel.zero=2", "resources.workers=1")
    ) == ["resources.workers: 2 -> 1"]


def test_a_resume_with_a_refused_change_names_the_fields(tmp_path: Path) -> None:
    run = tmp_path / "r"
    checkpoint = run / "checkpoint_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"step": 2}))
    (checkpoint / "spec.yaml").write_text(spec_to_yaml(spec(root=tmp_path)))
    (checkpoint / "manifest.json").write_text(json.dumps({"files": {}}))
    refuse_conflicting_resume(spec("training.steps=100", root=tmp_path), run)  # allowed
    with pytest.raises(UserError, match=r"these differ: optim.lr: 0.003 -> 0.01; training.batch_size: 8 -> 4\. "):
        refuse_conflicting_resume(spec("optim.lr=0.01", "training.batch_size=4", root=tmp_path), run)


def _compare_corpus(topology, stored: dict, tmp: str) -> None:
    mine = dict(stored)
    if topology.rank == 1:
        mine["bytes"] += 10  # this rank's node has a longer file
    try:
        check_corpus_on_every_rank(stored, mine, Path("ckpt"), world_of_one())
    except CorpusChanged as err:
        Path(tmp, f"rank{topology.rank}").write_text(str(err))


@pytest.mark.distributed
def test_a_corpus_change_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    stored = {"files": 3, "files_sha256": "ab", "bytes": 100, "train_bytes": 90, "val_bytes": 10, "windows": 2}
    spawn(_compare_corpus, 2, 2, stored, str(tmp_path))
    messages = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "rank 1: bytes: 100 -> 110" in messages[0] and "rank 0" not in messages[0]
    check_corpus_on_every_rank(None, stored, Path("old"), world_of_one())  # written before fingerprints: passes


def test_the_spec_history_keeps_every_spec_a_run_used(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_run_files(spec(), run)
    write_run_files(spec(), run)  # the same spec again: no new entry
    write_run_files(spec("training.steps=48"), run)
    entries = sorted((run / "spec-history").iterdir())
    assert [p.name for p in entries] == ["0001.yaml", "0002.yaml"]
    assert "steps: 24" in entries[0].read_text() and "steps: 48" in entries[1].read_text()
    assert (run / "spec.yaml").read_text() == entries[1].read_text()


HOLD = """
import sys, time
from pathlib import Path
from shardyard.runtime.run_lease import acquire
acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_two_jobs_cannot_hold_one_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            run_lease.RunBusy, match=rf"in use by another job \(pid {holder.pid} on {socket.gethostname()}"
        ):
            run_lease.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    heard: list[str] = []
    lease = run_lease.acquire(run, report=heard.append)  # the holder died: its lease is stale
    assert f"process {holder.pid}" in heard[0] and "has exited" in heard[0]
    assert run_lease.read_lease(run)["pid"] == os.getpid()
    lease.release()
    assert run_lease.read_lease(run) is None


def test_a_lease_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path: Path) -> None:
    lease_file = RunDir(tmp_path).lease
    fresh = {"pid": 1, "host": "other-node", "owner": "x", "started": time.time(), "heartbeat": time.time()}
    lease_file.write_text(json.dumps(fresh))
    with pytest.raises(run_lease.RunBusy, match="pid 1 on other-node"):
        run_lease.acquire(tmp_path)
    lease_file.write_text(json.dumps({**fresh, "heartbeat": time.time() - run_lease.STALE_AFTER_S - 5}))
    heard: list[str] = []
    run_lease.acquire(tmp_path, report=heard.append).release()
    assert "heartbeat is" in heard[0]
    lease_file.write_bytes(b"\x00garbage")  # a torn lease file is stale, never a traceback
    run_lease.acquire(tmp_path, report=heard.append).release()
    assert "unreadable" in heard[-1]
