"""An elastic MoE job on a real 2-node Ray cluster (two raylets of 2 CPUs on this machine):
`resources.workers: {min: 2, max: 4}`, `training.global_batch: 12`, `parallel.expert_parallel: auto`.

One run carries every check (starting worker groups is what costs time): it starts at 4 workers
(EP 4, micro-batch 3 x accum 1), the second node's raylet is SIGKILLed and the job goes on at 2
workers on the head without waiting (EP 2, 3 x accum 2), then a node joins and the group grows back
to 4 after a checkpoint at an agreed step. Against a fixed 2-worker run of the same spec on the
plain gloo group (the smallest world that fits): every step's loss and grad norm within 1e-4,
the sample ledger holds every window of the run exactly once beyond the steps the loss redid, the
loss redid exactly the steps since its last checkpoint and the growth none, and each resize printed
its one line."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardyard import envvars
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import load_spec
from shardyard.runtime.watchdog import read_heartbeats
from shardyard.tracking.logger import read_metrics
from tests.helpers import (
    ROOT,
    SHARDYARD,
    assert_same_series,
    tiny_spec_yaml,
    train_grad_norms,
    train_losses,
    train_on_gloo,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.kills_nodes]
STEPS, EVERY = 60, 10
LOSE, GROW = EVERY + 3, 30  # the steps after which the job waits for the node loss and for the growth request
MODEL = "{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 64}, moe: {num_experts: 4, top_k: 2, balance_scope: global}}"
TRAINING = f"{{steps: {STEPS}, batch_size: 3, global_batch: 12, eval_every: 0, eval_bytes: 2048, log_every: 1}}"


def job_yaml(tmp_path: Path, name: str, workers: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        tiny_spec_yaml(
            name,
            tmp_path / "runs",
            model=MODEL,
            training=TRAINING,
            # lr 1e-3: float summation order differs between layouts; a gentler step keeps it from growing
            optim="{lr: 1.0e-3, schedule: {warmup: 4}}",
            resources=f"{{workers: {workers}, cpus_per_worker: 1, max_failures: 3, resize_interval_s: 2}}",
            checkpoint=f"{{dir: {tmp_path / 'runs'}, every: {EVERY}, keep: 3}}",
        )
        + "parallel: {expert_parallel: auto}\n"
    )
    return path


def wait_for(condition, timeout: float = 300, what: str = "") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)  # each poll parses the run's files: a busy loop competes with the job for 2 cores
    raise AssertionError(f"timed out waiting for {what}")


def training_at(run_dir: Path, world: int, since: float) -> bool:
    """A group of `world` ranks that started after `since` has logged a step."""
    beats = read_heartbeats(RunDir(run_dir).heartbeats, since=since)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return len(beats) == world and any(r.get("kind") == "train" and r.get("world_size") == world for r in records[-3:])


def growth_requested(run_dir: Path, since: float) -> bool:
    """The elastic controller asked the running group for its resize checkpoint after `since`."""
    events = RunDir(run_dir).events
    lines = events.read_text().splitlines() if events.exists() else []
    return any(e.get("event") == "resize_request" and e["time"] >= since for e in map(json.loads, lines))


def resumes(run_dir: Path) -> list[tuple[int, int, int]]:
    """(world, resume step, newest step logged before it) per resume of the run, in the order logged."""
    out, newest = [], 0
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if record.get("kind") == "train":
            newest = max(newest, record["step"])
        elif record.get("event") == "resume":
            out.append((record["world"], record["step"], newest))
    return out


def windows_of_steps(steps: range, num_windows: int, seed: int = 0) -> collections.Counter:
    """The global windows steps `steps` train on (the loader's order; 12 per step, one epoch here)."""
    order = np.random.default_rng([seed, 0]).permutation(num_windows)
    return collections.Counter(int(w) for s in steps for w in order[(s - 1) * 12 : s * 12])


def test_an_elastic_moe_job_shrinks_on_a_lost_node_grows_back_and_trains_like_a_fixed_run(
    cluster: Any, tmp_path: Path
) -> None:
    spec = job_yaml(tmp_path, "elastic", "{min: 2, max: 4}")
    run_dir = tmp_path / "runs" / "elastic"
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    out = tmp_path / "elastic.out"
    # The job pauses (every rank, at the step boundary) after step LOSE until the node is lost, and
    # after step GROW until the controller has asked for the growth: the order of events does not
    # depend on how fast this machine trains.
    lost, grow = tmp_path / "node-lost", tmp_path / "growth-requested"
    start = time.time()
    proc = subprocess.Popen(
        [*SHARDYARD, "run", str(spec), "--address", cluster.address],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, envvars.SAMPLE_LEDGER: str(ledger), envvars.PAUSE_AT: f"{LOSE}:{lost},{GROW}:{grow}"},
    )
    try:
        wait_for(lambda: training_at(run_dir, 4, start), what="4 workers training")
        wait_for(lambda: max(train_losses(run_dir)) >= LOSE, what="a checkpoint and 3 more steps")
        other = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
        lost_at = time.time()
        os.kill(other.all_processes["raylet"][0].process.pid, signal.SIGKILL)
        # the restarted group trains from the checkpoint up to LOSE and waits there too: released once
        # it runs, so the lost group cannot train past LOSE while its ranks die
        wait_for(lambda: training_at(run_dir, 2, lost_at), what="2 workers training on the head")
        lost.touch()
        cluster.remove_node(other, allow_graceful=False)
        joined_at = time.time()
        cluster.add_node(num_cpus=2, object_store_memory=120 * 1024**2)
        wait_for(lambda: growth_requested(run_dir, joined_at), what="the controller to ask for the growth")
        grow.touch()
        wait_for(lambda: training_at(run_dir, 4, joined_at), what="the group to grow back to 4")
        assert proc.wait(timeout=600) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()

    # The reference: a fixed 2-worker run of the same spec (the smallest world that fits), the same
    # Trainer on 2 gloo ranks without Ray (no worker group to start).
    fixed_dir = tmp_path / "runs" / "fixed"
    train_on_gloo(load_spec(job_yaml(tmp_path, "fixed", "2")), fixed_dir, 2)
    assert_same_series(train_losses(run_dir), train_losses(fixed_dir), 1e-4, "loss")
    assert_same_series(train_grad_norms(run_dir), train_grad_norms(fixed_dir), 1e-4, "grad norm")

    # Steps redone: the loss redid the steps since its last checkpoint, the growth none.
    (lost_world, lost_resume, lost_newest), (grown_world, grown_resume, grown_newest) = resumes(run_dir)
    assert (lost_world, grown_world) == (2, 4)
    assert lost_resume % EVERY == 0 and lost_newest - lost_resume < EVERY, (lost_resume, lost_newest)
    assert grown_resume == grown_newest, "the growth redid steps"
    records = read_metrics(run_dir)
    assert [r["world_size"] for r in records if r.get("kind") == "train" and r["step"] in (1, STEPS)] == [4, 4]

    # The sample ledger: every window of steps 1..STEPS, twice exactly where the loss redid steps (a
    # step cut short by the kill had read part of its windows).
    seen = collections.Counter()
    for file in ledger.glob("rank*-world*.txt"):
        seen.update(int(line.split()[1]) for line in file.read_text().splitlines())
    num_windows = _num_windows(run_dir)
    trained = windows_of_steps(range(1, STEPS + 1), num_windows)
    redone = windows_of_steps(range(lost_resume + 1, lost_newest + 2), num_windows)
    assert set(seen) <= set(trained), "a window outside the run's steps"
    assert all(seen[w] >= 1 for w in trained), "a window never trained on"
    assert all(seen[w] == 1 for w in trained if w not in redone), "a window trained twice outside the redone steps"
    assert all(seen[w] <= 2 for w in redone)

    # One line per resize, in the terminal and in driver.log.
    node = other.node_id[:8]
    lost_line = (
        f"workers 4 -> 2 (node {node} lost), ep 4 -> 2, micro-batch 3 x accum 2, resuming from step {lost_resume}"
    )
    grown_line = f"workers 2 -> 4 (room for 4), ep 2 -> 4, micro-batch 3 x accum 1, resuming from step {grown_resume}"
    driver_log = RunDir(run_dir).driver_log.read_text()
    for line in (lost_line, grown_line):
        assert text.count(line) == 1 and line in driver_log, (line, text[-3000:])
    assert "Traceback" not in text


def _num_windows(run_dir: Path) -> int:
    from shardyard.data.training_data import load_training_data

    spec = load_spec(run_dir / "spec.yaml")
    return (len(load_training_data(spec.data).train) - 1) // spec.data.seq_len
