"""Bring your own data: sources, tokenizers, prepared shards, mixtures, bits per byte (no Ray here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shardyard.data.corpus import is_validation, load_corpus
from shardyard.data.mixture import MixtureWindowStream
from shardyard.data.prepare import prepare
from shardyard.data.shards import ShardedTokens
from shardyard.data.training_data import load_training_data
from shardyard.platform.errors import UserError
from shardyard.platform.schema import DataSpec
from shardyard.platform.spec import load_spec_text
from tests.helpers import tiny_spec_yaml

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega"
).split()


def documents(n: int, seed: int = 0) -> list[str]:
    """ASCII documents of 40-120 words (so decoded tokens map to bytes one to one)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(40, 120)))) + f" doc{i}." for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), path)
    return path


def write_hf(path: Path, docs: list[str]) -> Path:
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    return path


def expected_split(docs: list[str], key: str, val_fraction: float) -> tuple[bytes, bytes]:
    """The train / val byte streams the split rule promises: row documents + newline, in row order."""
    train = b"".join((d + "\n").encode() for i, d in enumerate(docs) if not is_validation(f"{key}#{i}", val_fraction))
    val = b"".join((d + "\n").encode() for i, d in enumerate(docs) if is_validation(f"{key}#{i}", val_fraction))
    return train, val


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_row_sources_prepare_to_the_promised_byte_streams(tmp_path: Path, fmt: str) -> None:
    docs = documents(60)
    if fmt == "jsonl":
        source, key = {"path": str(write_jsonl(tmp_path / "c.jsonl", docs))}, "s0/c.jsonl"
    elif fmt == "parquet":
        source, key = {"path": str(write_parquet(tmp_path / "c.parquet", docs)), "text_field": "body"}, "s0/c.parquet"
    else:
        source, key = {"path": str(write_hf(tmp_path / "saved", docs))}, "s0/saved"
    spec = DataSpec(
        sources=[source], seq_len=16, val_fraction=0.2, prepared_dir=str(tmp_path / "prep"), shard_tokens=1000
    )
    report = prepare(spec)
    data = load_training_data(spec)
    train, val = expected_split(docs, key, 0.2)
    assert (
        bytes(data.train.to_numpy()) == train
        and bytes(np.asarray(data.held_out.data[0 : len(data.held_out.data)])) == val
    )
    assert len(data.train.shards) == math.ceil(len(train) / 1000)  # fixed-size shards, the last shorter
    assert data.fingerprint["train_bytes"] == len(train) and data.fingerprint["windows"] == (len(train) - 1) // 16
    assert not report.skipped and prepare(spec).skipped  # idempotent: the fingerprint is found


def test_sharded_tokens_slice_like_one_array() -> None:
    flat = np.arange(1000, dtype=np.uint16)
    tokens = ShardedTokens([flat[:300], flat[300:700], flat[700:]])
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, 1000))
        b = int(rng.integers(a, 1001))
        np.testing.assert_array_equal(tokens[a:b], flat[a:b])
    view = tokens.view(250, 950)
    np.testing.assert_array_equal(view[40:500], flat[290:750])
    assert len(view) == 700


@pytest.mark.parametrize(
    "case, content, message",
    [
        ("corrupt", b'{"text": "fine"}\n{"text": "bro\n', "line 2: not valid JSON"),
        ("missing", b'{"text": "fine"}\n{"body": "no text here"}\n', "line 2: no field 'text'"),
        ("empty", b"", "empty file"),
        ("not-utf8", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8"),
    ],
)
def test_bad_input_names_file_and_row_and_leaves_nothing(
    tmp_path: Path, case: str, content: bytes, message: str
) -> None:
    good = write_jsonl(tmp_path / "a-good.jsonl", documents(5))
    bad = tmp_path / f"b-{case}.jsonl"
    bad.write_bytes(content)
    spec = DataSpec(sources=[{"path": str(good)}, {"path": str(bad)}], prepared_dir=str(tmp_path / "prep"))
    with pytest.raises(UserError, match=message) as err:
        prepare(spec)
    assert str(bad) in str(err.value) and "data.sources[1]" in str(err.value)
    assert list((tmp_path / "prep").iterdir()) == []  # no staging directory, no half-written shards


def test_plain_text_needs_utf8_only_for_a_text_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 8)
    ok = DataSpec(sources=[{"path": str(tmp_path / "bin.txt")}], seq_len=16, prepared_dir=str(tmp_path / "p1"))
    assert len(load_training_data(ok).train) > 0  # bytes read anything (one file: validation is its tail)
    bpe = DataSpec(
        sources=[{"path": str(tmp_path / "bin.txt")}], tokenizer="bpe:300", prepared_dir=str(tmp_path / "p2")
    )
    with pytest.raises(UserError, match=r"bin\.txt: not UTF-8"):
        prepare(bpe)


def test_changed_file_makes_a_new_fingerprint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", documents(20))
    spec = DataSpec(sources=[{"path": str(path)}], seq_len=16, prepared_dir=str(tmp_path / "prep"))
    first = prepare(spec)
    write_jsonl(path, documents(21))
    second = prepare(spec)
    assert not second.skipped and second.directory != first.directory


def test_byte_models_refuse_a_tokenizer(tmp_path: Path) -> None:
    model = (
        "{kind: megabyte, stages: [{width: 32, depth: 1, heads: 2, patch_size: 8}, "
        "{width: 32, depth: 1, heads: 2, patch_size: 8}]}"
    )
    with pytest.raises(UserError, match="data.tokenizer: 'bpe:512', but a megabyte model reads bytes"):
        load_spec_text(
            tiny_spec_yaml("b", tmp_path, model=model, data="{paths: [stdlib], seq_len: 64, tokenizer: 'bpe:512'}")
        )
    with pytest.raises(ValueError, match="needs an integer vocab_size above 256"):
        DataSpec(tokenizer="bpe:100")


def test_mixture_honours_weights_per_batch_and_resumes_at_another_world_size() -> None:
    """Every token encodes its source and position (source * 100_000 + offset), so whole windows are
    compared: a window skipped, repeated or misaligned inside a source shows, not only the source."""
    batch, seq = 4, 8
    weights = [0.6, 0.3, 0.1]
    lengths = [40 * seq + 1, 20 * seq + 5, 10 * seq + 3]  # 40, 20 and 10 windows: several passes in 400 slots
    sources = [np.arange(n, dtype=np.int64) + 100_000 * i for i, n in enumerate(lengths)]

    def stream(rank: int, world: int) -> MixtureWindowStream:
        return MixtureWindowStream(sources, weights, seq, batch, rank, world, seed=3)

    def decode(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """(source, window) of a yielded pair, checked to be exactly that window of that source."""
        source, start = divmod(int(inputs[0]), 100_000)
        assert start % seq == 0 and start + seq < lengths[source], (source, start)
        expected = torch.arange(start, start + seq + 1) + 100_000 * source
        assert torch.equal(inputs, expected[:-1]) and torch.equal(targets, expected[1:]), (inputs, targets)
        return source, start // seq

    one = iter(stream(0, 1))
    drawn = [decode(*next(one)) for _ in range(400)]
    span = 2 * batch  # a global batch at world 2
    for g in range(0, 400, span):
        counts = np.bincount([s for s, _ in drawn[g : g + span]], minlength=3)
        assert np.all(np.abs(counts - np.array(weights) * span) <= 1.0 + 1e-9), counts
    # within each source, every pass reads each of its windows exactly once, in a seeded order
    for i, n in enumerate(s // seq for s in lengths):
        windows = [w for s, w in drawn if s == i]
        passes = [windows[k : k + n] for k in range(0, len(windows) - n + 1, n)]
        assert len(passes) >= 3, (i, len(windows))
        for p in passes:
            assert sorted(p) == list(range(n)), (i, p)
        assert passes[0] != passes[1]  # each pass draws a new permutation
    # world 2 for 5 steps, then world 1 from the saved position: the same windows as world 1 throughout
    ranks = [stream(r, 2) for r in range(2)]
    its = [iter(r) for r in ranks]
    seen = []
    for _ in range(5):
        for r in range(2):
            seen += [decode(*next(its[r])) for _ in range(batch)]
    assert ranks[0].position() == ranks[1].position() == {"epoch": 0, "pos": 5 * span}
    resumed = stream(0, 1)
    resumed.set_position(ranks[1].position())
    it = iter(resumed)
    seen += [decode(*next(it)) for _ in range(3 * batch)]
    assert seen == drawn[: len(seen)]


def test_byte_cache_max_bytes_is_a_hard_cap(tmp_path: Path) -> None:
    root = tmp_path / "files"
    root.mkdir()
    for i in range(12):
        (root / f"f{i}.txt").write_bytes(bytes([65 + i]) * 1000)
    spec = DataSpec(
        paths=[str(root)],
        extensions=[".txt"],
        seq_len=16,
        max_bytes=5500,
        val_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    corpus = load_corpus(spec)
    assert len(corpus.train) + len(corpus.val) == 5500
    cached = next((tmp_path / "cache").glob("*/train.bin"))
    cached.write_bytes(b"x")  # a damaged cache is rebuilt, not used
    assert len(load_corpus(spec).train) == len(corpus.train)
    assert not list((tmp_path / "cache").glob("*/.*.tmp"))


def test_bpe_bits_per_byte_match_a_hand_computation(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from shardyard.models import build_model
    from shardyard.runtime.evaluation import evaluate

    path = write_jsonl(tmp_path / "c.jsonl", documents(80))
    spec = DataSpec(sources=[{"path": str(path)}], tokenizer="bpe:512", seq_len=32, prepared_dir=str(tmp_path / "prep"))
    data = load_training_data(spec)
    assert data.vocab_size == 512 and (data.prepared.directory / "tokenizer.json").exists()
    assert 1.5 < data.bytes_per_token < 6
    job = load_spec_text(tiny_spec_yaml("bpe", tmp_path))
    torch.manual_seed(0)
    model = build_model(job.model, 32, data.vocab_size)
    val = np.asarray(data.held_out.data[0 : len(data.held_out.data)]).astype(np.int64)
    windows = torch.from_numpy(np.stack([val[i * 32 : i * 32 + 33] for i in range(3)]))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    result = evaluate(model, [(inputs, targets)], torch.device("cpu"), token_bytes=torch.from_numpy(data.token_bytes))
    # by hand: summed nats / ln 2 over the UTF-8 bytes of the decoded target text
    hf = Tokenizer.from_file(str(data.prepared.directory / "tokenizer.json"))
    with torch.no_grad():
        logits, _ = model(inputs)
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    covered = sum(len(hf.decode(row.tolist()).encode("utf-8")) for row in targets)
    assert result.bytes == covered
    assert result.bpb == pytest.approx(float(-logp.sum()) / math.log(2) / covered, rel=1e-6)


def test_loader_and_validation_on_shards_equal_those_on_one_array() -> None:
    """The loader's guarantees (tested on flat arrays) carry over: over shards it yields the same batches,
    resumes at the same windows, and every rank gets the same number of validation batches."""
    from shardyard.data.loader import build_train_loader
    from shardyard.data.validation import HeldOutText, rank_batches

    flat = np.random.default_rng(0).integers(0, 4096, 20_000).astype(np.uint16)
    sharded = ShardedTokens([flat[i : i + 3000] for i in range(0, len(flat), 3000)])
    for rank in range(2):
        a, b = build_train_loader(flat, 32, 4, rank, 2, 5), build_train_loader(sharded, 32, 4, rank, 2, 5)
        for _ in range(3):
            a.next_batch(), b.next_batch()
        b.set_position(a.position())
        for _ in range(40):  # 320 windows per rank pair: many cross a shard boundary
            x, y = a.next_batch(), b.next_batch()
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    counts = {len(rank_batches(HeldOutText(sharded, np.zeros(1, np.int64)), 32, 4096, 4, r, 2)) for r in range(2)}
    assert len(counts) == 1
