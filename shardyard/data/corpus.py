"""Byte corpora: resolve `spec.data.paths` to files, split train/validation by file, load bytes.

The split is chosen per file by a hash of its path relative to its root, so it is the same on every
machine and every worker, and never leaks a file into both halves.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardyard.platform.errors import UserError
from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.schema import DataSpec

STDLIB = "stdlib"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files_under(root: Path, extensions: list[str]) -> list[Path]:
    """Files under `root` with one of `extensions` ("*": any), sorted; installed packages and bytecode
    caches are not descended into (a stdlib or a repository with a venv holds tens of thousands of files
    there), and neither are symlinked directories (as Path.rglob)."""
    keep_all = "*" in extensions
    skip = {"site-packages", "__pycache__", "dist-packages"}
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in skip]
        for name in names:
            path = Path(directory) / name
            if name not in skip and (keep_all or path.suffix in extensions) and path.is_file():
                found.append(path)
    return sorted(found)


def resolve_files(spec: DataSpec) -> list[tuple[Path, str]]:
    """(file, stable key) pairs; the key (path relative to its root) decides the split."""
    found: dict[str, Path] = {}
    for entry in spec.paths:
        if entry == STDLIB:
            root = stdlib_root()
            for f in _files_under(root, spec.extensions):
                found.setdefault(f"stdlib/{f.relative_to(root)}", f)
            continue
        if is_remote(entry):
            raise UserError(f"data.paths: {entry!r} matches no file or directory (object storage: use data.sources)")
        path = local_path(entry)
        if path.is_dir():
            for f in _files_under(path, spec.extensions):
                found.setdefault(str(f.relative_to(path)), f)
        elif path.is_file():
            found.setdefault(path.name, path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise UserError(f"data.paths: {entry!r} matches no file or directory")
            for f in files:
                found.setdefault(str(f), f)
    if not found:
        raise UserError(f"data.paths: {spec.paths} hold no files with extensions {spec.extensions}")
    return sorted(((f, key) for key, f in found.items()), key=lambda item: item[1])


def is_validation(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


@dataclass
class ByteCorpus:
    train: np.ndarray  # uint8, memory-mapped from disk
    val: np.ndarray  # uint8, memory-mapped from disk
    train_files: int
    val_files: int
    val_offsets: np.ndarray  # int64 start of each held-out file (or file piece) in `val`, ascending, first 0
    files: list[tuple[str, int]] = field(default_factory=list)  # (key, bytes) of the files read, in order

    def fingerprint(self, seq_len: int) -> dict[str, object]:
        """What a checkpoint's data position depends on: {files, files_sha256, bytes, train_bytes,
        val_bytes, windows} of the files read (keys and bytes taken) and of the loaded streams; stored in
        every checkpoint and compared on every rank at resume (runtime.resume_guard)."""
        digest, total = hashlib.sha256(), 0
        for key, size in self.files:
            digest.update(f"{key}\0{size}\n".encode())
            total += size
        return {
            "files": len(self.files),
            "files_sha256": digest.hexdigest(),
            "bytes": total,
            "train_bytes": int(len(self.train)),
            "val_bytes": int(len(self.val)),
            "windows": int((len(self.train) - 1) // seq_len),
        }


Part = tuple[Path, int]  # a file and how many of its leading bytes belong to the corpus (max_bytes cuts the last)


def _cache_key(spec: DataSpec, files: list[tuple[Path, str]]) -> str:
    h = hashlib.sha1(f"{spec.val_fraction}|{spec.max_bytes}".encode())
    for f, key in files:
        st = f.stat()
        h.update(f"{key}|{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _stream_into(path: Path, parts: list[Part]) -> int:
    """Concatenate file prefixes into `path` one buffer at a time, atomically (temp name, then rename;
    the temp file is removed when anything fails, and the result is checked for its expected size)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    expected = sum(take for _, take in parts)
    written = 0
    try:
        with open(tmp, "wb") as out:
            for part, take in parts:
                left = take
                with open(part, "rb") as src:
                    while left and (chunk := src.read(min(1 << 22, left))):
                        out.write(chunk)
                        written += len(chunk)
                        left -= len(chunk)
        if written != expected:
            raise UserError(
                f"data.paths: the corpus files changed while being cached ({written} bytes read, "
                f"{expected} expected); run again"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _choose(spec: DataSpec, files: list[tuple[Path, str]]) -> list[tuple[Path, str, int]]:
    """(file, key, bytes taken) in sorted order; data.max_bytes is a hard cap (the last file is cut)."""
    chosen, total = [], 0
    for f, key in files:
        size = f.stat().st_size
        if spec.max_bytes is not None:
            if total >= spec.max_bytes:
                break
            size = min(size, spec.max_bytes - total)
        chosen.append((f, key, size))
        total += size
    return chosen


def load_corpus(spec: DataSpec) -> ByteCorpus:
    """Split by file and stream the files, without holding them in memory, into a cache of two flat
    byte files (train, val) that every worker memory-maps; the cache is keyed by the files' paths,
    sizes and mtimes, built once per node under a file lock and checked for its size when found.
    A single file (one long document) is memory-mapped in place and split at (1 - val_fraction) of
    its length instead."""
    files = resolve_files(spec)
    chosen = _choose(spec, files)
    key = _cache_key(spec, [(f, k) for f, k, _ in chosen])
    val_parts = [(f, take) for f, k, take in chosen if is_validation(k, spec.val_fraction)]
    train_parts = [(f, take) for f, k, take in chosen if not is_validation(k, spec.val_fraction)]
    if len(chosen) == 1 or not val_parts or not train_parts:
        if len(chosen) == 1:
            whole = _memmap(chosen[0][0])[: chosen[0][2]]
        else:
            whole = _cached(spec, key, "all", [(f, take) for f, _, take in chosen])
        cut = int(len(whole) * (1 - spec.val_fraction))
        train, val, n_train, n_val = whole[:cut], whole[cut:], len(chosen), 0
        val_offsets = _file_offsets([take for _, _, take in chosen], skip=cut)
    else:
        train = _cached(spec, key, "train", train_parts)
        val = _cached(spec, key, "val", val_parts)
        n_train, n_val = len(train_parts), len(val_parts)
        val_offsets = _file_offsets([take for _, take in val_parts])
    need = spec.seq_len + 1
    if len(train) < need or len(val) < need:
        raise UserError(
            f"data: corpus too small for data.seq_len={spec.seq_len}: {len(train)} training and "
            f"{len(val)} validation bytes (each needs at least {need})"
        )
    return ByteCorpus(train, val, n_train, n_val, val_offsets, [(k, take) for _, k, take in chosen])


def _file_offsets(sizes_list: list[int], skip: int = 0) -> np.ndarray:
    """Start of each file in the concatenation of files of `sizes_list` bytes with its first `skip`
    bytes removed (files wholly inside the removed prefix are dropped; the one it cuts starts at 0).
    Validation sampling uses these to represent every held-out file in proportion to its bytes."""
    sizes = np.array(sizes_list, dtype=np.int64)
    ends = np.cumsum(sizes) - skip
    starts = ends - sizes
    keep = (ends > 0) & (sizes > 0)
    return np.maximum(starts[keep], 0) if keep.any() else np.zeros(1, dtype=np.int64)


def _cached(spec: DataSpec, key: str, split: str, parts: list[Part]) -> np.ndarray:
    """The cached stream of `parts`: built once per node under a file lock (other workers wait, then
    find it), rebuilt when its size is not the expected one (a damaged cache)."""
    root = Path(spec.cache_dir).expanduser() if spec.cache_dir else Path.home() / ".cache" / "shardyard" / "corpus"
    directory = root / key
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{split}.bin"
    expected = sum(take for _, take in parts)
    with open(directory / f".{split}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists() or path.stat().st_size != expected:
                _stream_into(path, parts)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _memmap(path)
