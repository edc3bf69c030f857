"""Local paths and remote (object-storage) URLs: the one check every part makes.

A location with a scheme other than `file` (s3://, gs://, memory://, ...) is remote and goes through
fsspec (data/storage.py). Everything else is a local path: `file:///x` is the path `/x`, and `~` is
expanded.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_SCHEME = "file://"


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith(LOCAL_SCHEME)


def local_path(location: str) -> Path:
    """A local location as a path (`file://` stripped, `~` expanded); ValueError for a remote URL."""
    if is_remote(location):
        raise ValueError(f"{location} is a remote URL, not a local path")
    return Path(location.removeprefix(LOCAL_SCHEME)).expanduser()
