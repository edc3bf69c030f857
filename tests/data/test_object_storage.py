"""Data and prepared shards on a real S3-compatible server (moto in server mode on loopback): the
client is the real s3fs / pyarrow one, configured only through the usual environment variables."""

from __future__ import annotations

import math
from pathlib import Path

from shardyard.data.prepare import prepare
from shardyard.data.training_data import load_training_data
from shardyard.platform.schema import DataSpec
from tests.data.test_prepare import documents, write_jsonl


def test_sources_and_prepared_shards_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    from shardyard.data.storage import filesystem

    fs, _ = filesystem(s3_bucket)
    for i in range(2):
        local = write_jsonl(tmp_path / f"part{i}.jsonl", documents(40, seed=i))
        fs.put_file(str(local), f"{s3_bucket[5:]}/corpus/part{i}.jsonl")
    spec = DataSpec(
        sources=[{"path": f"{s3_bucket}/corpus", "format": "jsonl"}],
        tokenizer="bpe:300",
        seq_len=16,
        prepared_dir=f"{s3_bucket}/prepared",
        cache_dir=str(tmp_path / "node-a"),
    )
    report = prepare(spec)
    assert report.directory.startswith(f"{s3_bucket}/prepared/")
    assert fs.exists(f"{report.directory.removeprefix('s3://')}/index.json")
    assert not list((tmp_path / "node-a" / "staging").iterdir())  # local staging cleaned up
    # another node (fresh cache) finds the prepared data in the bucket and only copies + memory-maps it
    other = spec.model_copy(update={"cache_dir": str(tmp_path / "node-b")})
    assert prepare(other).skipped
    data = load_training_data(other)
    local_reference = load_training_data(spec.model_copy(update={"prepared_dir": str(tmp_path / "local-prep")}))
    assert bytes(data.train.to_numpy()) == bytes(local_reference.train.to_numpy())
    assert data.fingerprint == local_reference.fingerprint and math.isclose(
        data.bytes_per_token, local_reference.bytes_per_token
    )
