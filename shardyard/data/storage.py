"""Object-storage URLs (s3://, gs://, ... through fsspec) behind one small interface; which locations
are remote is platform/locations.py's one check.

Local paths stay plain `pathlib` (no fsspec import on the byte path). A URL with a scheme goes to
fsspec; for s3 the endpoint and credentials come from the usual environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which botocore
reads itself; AWS_ENDPOINT_URL is also passed explicitly so older clients honour it.
"""

from __future__ import annotations

import os
from typing import Any


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0]
