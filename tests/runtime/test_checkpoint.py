"""Checkpoint files: round trip, atomic replacement, half-written ones never picked."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardyard.runtime.checkpoint import (find_latest_checkpoint, read_checkpoint, rng_state, set_rng_state,
                                          write_checkpoint)


def test_round_trip_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = {"model": {"w": torch.randn(3, 3)}, "step": 7, "rng": rng_state()}
    write_checkpoint(tmp_path / "checkpoint_a", state, {"step": 7})
    expected_next = torch.rand(4)
    loaded, meta = read_checkpoint(tmp_path / "checkpoint_a")
    assert meta == {"step": 7} and torch.equal(loaded["model"]["w"], state["model"]["w"])
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected_next)


def test_overwrite_is_atomic_and_partials_are_ignored(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint_1", {"x": 1}, {"step": 1})
    write_checkpoint(tmp_path / "checkpoint_1", {"x": 2}, {"step": 1})
    assert read_checkpoint(tmp_path / "checkpoint_1")[0] == {"x": 2}
    assert not list(tmp_path.glob(".*partial*")) and not list((tmp_path / "checkpoint_1").glob(".*tmp*"))
    write_checkpoint(tmp_path / "checkpoint_2", {"x": 3}, {"step": 2})
    # A crash mid-write leaves a directory without meta.json (or a staging dir): never chosen.
    (tmp_path / "checkpoint_3").mkdir()
    (tmp_path / "checkpoint_3" / "state.pt").write_bytes(b"\x00garbage")
    (tmp_path / ".checkpoint_4.partial-1").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_2"
    assert json.loads((tmp_path / "checkpoint_2" / "meta.json").read_text())["step"] == 2
