"""Validation windows: a deterministic sample of the whole held-out split, every file in proportion
to its bytes, equal shares on every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shardyard.data.corpus import is_validation, load_corpus, resolve_files
from shardyard.data.validation import (
    all_batches,
    batch_windows,
    eval_set_texts,
    held_out_split,
    load_text,
    rank_batches,
    select_windows,
    window_count,
    windows_per_file,
)
from shardyard.platform.errors import UserError
from shardyard.platform.schema import DataSpec, TrainingSpec


def _many_files(root: Path, count: int = 120, seed: int = 0) -> Path:
    """Files of very different sizes (200 B to 20 KB), each filled with its own byte value."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = int(rng.integers(200, 20_000))
        (root / f"f{i:03d}.txt").write_bytes(bytes([i % 256]) * size)
    return root


def test_val_offsets_are_the_held_out_files(tmp_path: Path) -> None:
    spec = DataSpec(
        paths=[str(_many_files(tmp_path / "c"))],
        extensions=[".txt"],
        seq_len=32,
        val_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    corpus = load_corpus(spec)
    held_out = [f for f, key in resolve_files(spec) if is_validation(key, 0.3)]
    sizes = [f.stat().st_size for f in held_out]
    assert corpus.val_offsets.tolist() == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    for f, start in zip(held_out, corpus.val_offsets):  # each offset is where that file's bytes begin
        assert bytes(corpus.val[start : start + 50]) == f.read_bytes()[:50]


def test_one_long_file_has_one_offset(tmp_path: Path) -> None:
    doc = tmp_path / "book.bin"
    doc.write_bytes(bytes(range(256)) * 100)
    corpus = load_corpus(DataSpec(paths=[str(doc)], seq_len=32, val_fraction=0.1))
    assert corpus.val_offsets.tolist() == [0]


@pytest.mark.parametrize("eval_fraction", [0.1, 0.5])
def test_windows_cover_every_file_in_proportion_to_its_size(tmp_path: Path, eval_fraction: float) -> None:
    spec = DataSpec(
        paths=[str(_many_files(tmp_path / "c"))],
        extensions=[".txt"],
        seq_len=32,
        val_fraction=0.4,
        cache_dir=str(tmp_path / "cache"),
    )
    text = held_out_split(load_corpus(spec))
    assert len(text.file_offsets) > 30
    length, seq = len(text.data), 32
    eval_bytes = int(length * eval_fraction)
    starts = select_windows(length, seq, eval_bytes, world=1)
    n = starts.size
    assert n == eval_bytes // seq
    counts = windows_per_file(starts, text.file_offsets)
    sizes = np.diff(np.append(text.file_offsets, length))
    expected = sizes * n / (length - seq)  # each file's share of the valid start positions
    assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9), (counts, expected)
    stride = (length - seq) / n
    assert np.all(counts[sizes >= stride] >= 1)  # every file at least a stride long is represented
    # and the first windows alone (the old scheme) would have covered only the first files
    assert (counts > 0).sum() > 0.9 * len(sizes)


def test_windows_are_deterministic_in_range_and_disjoint() -> None:
    length, seq = 100_003, 64
    a = select_windows(length, seq, 40_000, world=1)
    assert np.array_equal(a, select_windows(length, seq, 40_000, world=1))
    flat = np.sort(a.ravel())
    assert flat[0] >= 0 and flat[-1] + seq + 1 <= length
    assert np.all(np.diff(flat) >= seq + 1 - 1)  # windows of seq+1 bytes may share only the boundary byte
    everything = select_windows(length, seq, 10**9, world=1)  # capped: every non-overlapping window
    assert everything.size == (length - 1) // seq
    assert np.all(np.diff(np.sort(everything.ravel())) >= seq)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_window_counts_on_every_rank(world: int) -> None:
    length, seq = 77_777, 32
    starts = select_windows(length, seq, 10_000, world)
    assert starts.size == window_count(length, seq, 10_000, world)
    assert starts.shape[1] == (10_000 // seq) // world
    assert len(np.unique(starts)) == starts.size  # no window on two ranks
    for row in starts:  # every rank's share spans the whole stream, not one end of it
        assert row.min() < length * 0.1 and row.max() > length * 0.85
    data = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8)
    from shardyard.data.validation import HeldOutText

    text = HeldOutText(data, np.zeros(1, np.int64))
    shares = [rank_batches(text, seq, 10_000, 8, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len({tuple(b[0].shape[0] for b in s) for s in shares}) == 1  # identical batch shapes: EP-safe
    together = torch.cat([b[0] for b in all_batches(text, seq, 10_000, 8, world)])
    assert together.shape[0] == sum(b[0].shape[0] for s in shares for b in s)


def test_too_few_windows_for_the_ranks_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        select_windows(100, 32, 1000, world=4)


def test_batches_hold_shifted_windows() -> None:
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    batches = batch_windows(data, np.array([0, 100, 500]), 16, batch_size=2)
    assert [b[0].shape for b in batches] == [(2, 16), (1, 16)]
    inputs, targets = batches[0]
    assert inputs[1, 0] == 100 and torch.equal(inputs[:, 1:], targets[:, :-1]) and targets.dtype == torch.int64


def test_eval_sets_load_whole_texts_and_refuse_tiny_ones(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt").write_bytes(b"y" * 500)
    text = load_text([str(tmp_path)], [".txt"])
    assert len(text.data) == 1500 and text.file_offsets.tolist() == [0, 1000]
    (tmp_path / "tiny.md").write_bytes(b"z" * 40)
    with pytest.raises(UserError, match="training.eval_sets.small"):
        eval_set_texts({"small": [str(tmp_path / "tiny.md")]}, [".md"], seq_len=32, world=2)
    with pytest.raises(UserError, match="training.eval_sets.gone"):
        eval_set_texts({"gone": [str(tmp_path / "missing")]}, [".txt"], seq_len=32, world=1)


def test_eval_set_names_become_metric_names() -> None:
    assert TrainingSpec(eval_sets={"mine": ["x.txt"]}).eval_sets == {"mine": ["x.txt"]}
    with pytest.raises(ValueError, match="val/a b_bpb"):
        TrainingSpec(eval_sets={"a b": ["x"]})
    with pytest.raises(ValueError, match="at least one"):
        TrainingSpec(eval_sets={"empty": []})
