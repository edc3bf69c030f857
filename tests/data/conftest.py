"""A loopback S3-compatible server (moto in server mode) for the object-storage tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """s3://<bucket> on a real HTTP S3 endpoint on 127.0.0.1; the AWS_* variables point every client
    (s3fs, pyarrow, Ray Train, Ray workers started afterwards) at it. A fresh bucket name per server:
    fsspec caches file system instances and their listings per process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from shardyard.data.storage import filesystem

    bucket = f"shardyard-test-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.invalidate_cache()
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
