"""Byte corpus split and the resumable, rank-sharded loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shardyard.data.corpus import is_validation, load_corpus, resolve_files
from shardyard.data.loader import build_train_loader
from shardyard.platform.schema import DataSpec


def _corpus_dir(tmp_path: Path, files: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(files):
        (tmp_path / f"f{i:03d}.txt").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return tmp_path


def test_split_is_by_file_and_deterministic(tmp_path: Path) -> None:
    spec = DataSpec(paths=[str(_corpus_dir(tmp_path))], extensions=[".txt"], seq_len=32, val_fraction=0.2)
    a, b = load_corpus(spec), load_corpus(spec)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.val_files > 0 and a.train_files > 0 and a.val_files + a.train_files == 40
    keys = [key for _, key in resolve_files(spec)]
    assert sum(is_validation(k, 0.2) for k in keys) == a.val_files
    assert len(a.train) + len(a.val) == 40 * 2000


def test_stdlib_corpus_is_real_python() -> None:
    corpus = load_corpus(DataSpec(seq_len=64, max_bytes=500_000))
    text = corpus.train[:200_000].tobytes()
    assert b"def " in text and b"import " in text


def test_all_byte_values_reach_the_model(tmp_path: Path) -> None:
    (tmp_path / "all.bin").write_bytes(bytes(range(256)) * 64)
    corpus = load_corpus(DataSpec(paths=[str(tmp_path / "all.bin")], seq_len=32, val_fraction=0.1))
    inputs, targets = build_train_loader(corpus.train, 32, 64, 0, 1, 0).next_batch()
    assert inputs.dtype == torch.int64 and set(inputs.unique().tolist()) == set(range(256))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def _window_ids(batch: torch.Tensor, data: np.ndarray, seq_len: int) -> list[int]:
    index = {bytes(data[w * seq_len : w * seq_len + seq_len]): w for w in range((len(data) - 1) // seq_len)}
    return [index[bytes(row.to(torch.uint8).tolist())] for row in batch]


def test_ranks_get_disjoint_shards() -> None:
    data = np.random.default_rng(0).integers(0, 256, 64 * 100 + 1, dtype=np.uint8)
    seen = []
    for rank in range(2):
        loader = build_train_loader(data, 64, 4, rank, 2, seed=1)
        seen.append({bytes(row.tolist()) for _ in range(12) for row in loader.next_batch()[0].to(torch.uint8)})
    assert len(seen[0]) == len(seen[1]) == 48 and not seen[0] & seen[1]


def test_loader_resume_yields_the_same_batches() -> None:
    data = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8)
    loader = build_train_loader(data, 64, 4, rank=1, world=2, seed=3)
    for _ in range(7):
        loader.next_batch()
    position = loader.position()
    expected = [loader.next_batch()[0] for _ in range(200)]  # crosses an epoch boundary (97 steps/epoch)
    restored = build_train_loader(data, 64, 4, rank=1, world=2, seed=3)
    restored.set_position(position)
    for want in expected:
        assert torch.equal(restored.next_batch()[0], want)


@pytest.mark.parametrize("new_world", [1, 4])
def test_position_is_global_so_a_resume_on_another_world_size_skips_and_repeats_nothing(new_world: int) -> None:
    """2 ranks train 5 steps, then `new_world` ranks continue: together they read the epoch's order
    exactly once, in order, as one rank reading the whole global batch would."""
    data = np.random.default_rng(2).integers(0, 256, 64 * 400 + 1, dtype=np.uint8)
    before = [build_train_loader(data, 64, 4, r, 2, seed=5) for r in range(2)]
    consumed = [w for _ in range(5) for loader in before for w in _window_ids(loader.next_batch()[0], data, 64)]
    position = before[0].position()
    assert position == before[1].position() == {"epoch": 0, "pos": 40}
    after = [build_train_loader(data, 64, 8 // new_world, r, new_world, seed=5) for r in range(new_world)]
    for loader in after:
        loader.set_position(position)
    consumed += [w for _ in range(5) for loader in after for w in _window_ids(loader.next_batch()[0], data, 64)]
    reference = build_train_loader(data, 64, 8, 0, 1, seed=5)  # one rank, the same global batch
    expected = [w for _ in range(10) for w in _window_ids(reference.next_batch()[0], data, 64)]
    assert consumed == expected and len(set(consumed)) == 80


def test_corpus_is_streamed_into_a_memory_mapped_cache(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    corpus_dir = _corpus_dir(tmp_path / "files")
    spec = DataSpec(
        paths=[str(corpus_dir)], extensions=[".txt"], seq_len=32, val_fraction=0.2, cache_dir=str(tmp_path / "cache")
    )
    first = load_corpus(spec)
    assert isinstance(first.train, np.memmap)
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.bin"))
    assert cached == ["train.bin", "val.bin"]
    again = load_corpus(spec)  # served from the cache
    assert np.array_equal(first.train, again.train)
    (corpus_dir / "f000.txt").write_bytes(b"changed" * 100)  # a changed file makes a new cache entry
    load_corpus(spec)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_one_long_file_is_mapped_in_place_and_split_at_its_tail(tmp_path: Path) -> None:
    long_doc = tmp_path / "book.bin"
    long_doc.write_bytes(np.random.default_rng(3).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    corpus = load_corpus(DataSpec(paths=[str(long_doc)], seq_len=4096, val_fraction=0.1, cache_dir=str(tmp_path / "c")))
    assert len(corpus.train) == 90_000 and len(corpus.val) == 10_000
    assert not (tmp_path / "c").exists()  # no copy of a single file
    assert bytes(corpus.val[:5]) == long_doc.read_bytes()[90_000:90_005]
