"""Data and prepared shards on a real S3-compatible server (moto in server mode on loopback): the
client is the real s3fs / pyarrow one, configured only through the usual environment variables."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import pytest

from shardyard.data.prepare import prepare
from shardyard.data.training_data import load_training_data
from shardyard.platform.schema import DataSpec
from tests.data.test_prepare import documents, write_jsonl


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from shardyard.data.storage import filesystem

    fs, _ = filesystem("s3://shardyard-test")
    fs.mkdir("shardyard-test")
    try:
        yield "s3://shardyard-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_sources_and_prepared_shards_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    from shardyard.data.storage import filesystem

    fs, _ = filesystem(s3_bucket)
    for i in range(2):
        local = write_jsonl(tmp_path / f"part{i}.jsonl", documents(40, seed=i))
        fs.put_file(str(local), f"shardyard-test/corpus/part{i}.jsonl")
    spec = DataSpec(sources=[{"path": f"{s3_bucket}/corpus", "format": "jsonl"}], tokenizer="bpe:300", seq_len=16,
                    prepared_dir=f"{s3_bucket}/prepared", cache_dir=str(tmp_path / "node-a"))
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
    assert data.fingerprint == local_reference.fingerprint and math.isclose(data.bytes_per_token,
                                                                            local_reference.bytes_per_token)
