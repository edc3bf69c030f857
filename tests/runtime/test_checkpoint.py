"""Checkpoint directories: RNG as JSON, the manifest as commit marker, incomplete ones never picked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardyard.platform.spec import load_spec_text
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import tiny_spec_yaml


def test_rng_state_round_trips_through_json() -> None:
    """torch, numpy and Python's random module all continue where the saved state left them."""
    import random

    import numpy as np

    torch.manual_seed(5)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected_next = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected_next[0])
    assert np.array_equal(np.random.rand(4), expected_next[1])
    assert [random.random() for _ in range(4)] == expected_next[2]


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    spec = load_spec_text(
        tiny_spec_yaml("c", root),
        overrides=[
            "resources.workers=1",
            "training.steps=4",
            "training.eval_every=0",
            "checkpoint.every=2",
            "optim.schedule.warmup=1",
        ],
    )
    run_dir = root / "c"
    Trainer(spec, run_dir, LocalReporter(run_dir, 3)).fit()
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_is_complete_only_with_a_matching_manifest(run_with_two_checkpoints: Path, tmp_path: Path) -> None:
    run = _copy_run(run_with_two_checkpoints, tmp_path / "run")
    newest, older = run / "checkpoint_00000004", run / "checkpoint_00000002"
    assert ckpt.verify_checkpoint(newest) is None and ckpt.find_latest_checkpoint(run) == newest
    files = json.loads((newest / ckpt.MANIFEST_FILE).read_text())["files"]
    assert "meta.json" in files and "rng-rank0.json" in files and any(f.startswith("shards/") for f in files)

    (newest / ckpt.MANIFEST_FILE).unlink()  # what a save killed before its commit marker leaves
    assert "no manifest" in ckpt.verify_checkpoint(newest)
    skipped: list[str] = []
    assert ckpt.find_latest_checkpoint(run, report=skipped.append) == older
    assert skipped and "checkpoint_00000004" in skipped[0]


def test_a_truncated_shard_is_detected_and_skipped(run_with_two_checkpoints: Path, tmp_path: Path) -> None:
    run = _copy_run(run_with_two_checkpoints, tmp_path / "run")
    newest = run / "checkpoint_00000004"
    shard = next((newest / ckpt.SHARDS_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # the file a resume would read
    assert ckpt.read_meta(newest)["step"] == 4  # its meta still reads: only the size check can see this
    assert "bytes, the manifest says" in ckpt.verify_checkpoint(newest, full=False)
    assert ckpt.find_latest_checkpoint(run) == run / "checkpoint_00000002"


def test_a_truncated_meta_is_detected_and_skipped(run_with_two_checkpoints: Path, tmp_path: Path) -> None:
    run = _copy_run(run_with_two_checkpoints, tmp_path / "run")
    (run / "checkpoint_00000004" / ckpt.META_FILE).write_text('{"step": 4, "lay')  # truncated JSON, shards intact
    assert ckpt.find_latest_checkpoint(run) == run / "checkpoint_00000002"
    (run / "checkpoint_00000002" / ckpt.META_FILE).write_text('{"step": 2, "lay')
    assert ckpt.find_latest_checkpoint(run) is None  # no traceback, nothing complete left


def test_a_flipped_byte_fails_the_full_check(run_with_two_checkpoints: Path, tmp_path: Path) -> None:
    run = _copy_run(run_with_two_checkpoints, tmp_path / "run")
    shard = next((run / "checkpoint_00000004" / ckpt.SHARDS_DIR).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(run / "checkpoint_00000004", full=False) is None  # sizes still match
    assert "sha256" in ckpt.verify_checkpoint(run / "checkpoint_00000004", full=True)


def test_a_resume_at_another_world_size_draws_a_stream_of_its_own_not_the_runs_first(
    run_with_two_checkpoints: Path, tmp_path: Path
) -> None:
    """No saved stream belongs to a rank of another world size. Without one, a resumed rank would draw
    what the run drew from its start (router jitter's noise replayed); instead each rank starts a
    stream derived from the checkpoint and its rank: not the run's first draws, different per rank,
    the same on a rerun."""
    from shardyard.platform.spec import load_spec

    run = _copy_run(run_with_two_checkpoints, tmp_path / "run")
    checkpoint = run / "checkpoint_00000002"
    meta = json.loads((checkpoint / ckpt.META_FILE).read_text())
    meta["layout"]["world"] = 2  # as if written by 2 ranks (this rank 0's shards are all there is)
    (checkpoint / ckpt.META_FILE).write_text(json.dumps(meta))
    spec = load_spec(checkpoint / "spec.yaml")

    def draws_after(resume: bool) -> torch.Tensor:
        trainer = Trainer(spec, tmp_path / "again", LocalReporter(tmp_path / "again", 3))
        if resume:
            ckpt.load_checkpoint(trainer.train_state, checkpoint)
        return torch.rand(8)

    first, resumed = draws_after(resume=False), draws_after(resume=True)
    assert not torch.equal(first, resumed), "the resumed rank replays the run's first draws"
    assert torch.equal(draws_after(resume=True), resumed), "not reproducible"
    ckpt.seed_rng_after_resize(checkpoint, rank=1)
    assert not torch.equal(torch.rand(8), resumed), "two ranks draw the same stream"
