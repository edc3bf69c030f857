"""Byte corpora: resolve `spec.data.paths` to files, split train/validation by file, load bytes.

The split is chosen per file by a hash of its path relative to its root, so it is the same on every
machine and every worker, and never leaks a file into both halves.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardyard.platform.errors import UserError
from shardyard.platform.schema import DataSpec

STDLIB = "stdlib"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files_under(root: Path, extensions: list[str]) -> list[Path]:
    keep_all = "*" in extensions
    skip = {"site-packages", "__pycache__", "dist-packages"}
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts)
                  and (keep_all or p.suffix in extensions))


def resolve_files(spec: DataSpec) -> list[tuple[Path, str]]:
    """(file, stable key) pairs; the key (path relative to its root) decides the split."""
    found: dict[str, Path] = {}
    for entry in spec.paths:
        if entry == STDLIB:
            root = stdlib_root()
            for f in _files_under(root, spec.extensions):
                found.setdefault(f"stdlib/{f.relative_to(root)}", f)
            continue
        path = Path(entry).expanduser()
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
    train: np.ndarray  # uint8
    val: np.ndarray  # uint8
    train_files: int
    val_files: int


def load_corpus(spec: DataSpec) -> ByteCorpus:
    files = resolve_files(spec)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    total = 0
    for f, key in files:
        if spec.max_bytes is not None and total >= spec.max_bytes:
            break
        data = f.read_bytes()
        total += len(data)
        (val_parts if is_validation(key, spec.val_fraction) else train_parts).append(data)
    if len(files) == 1 or not val_parts:
        # One file (or an unlucky split): hold out its tail instead of a whole file.
        joined = b"".join(train_parts + val_parts)
        cut = int(len(joined) * (1 - spec.val_fraction))
        train_parts, val_parts = [joined[:cut]], [joined[cut:]]
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    need = spec.seq_len + 1
    if len(train) < need or len(val) < need:
        raise UserError(f"data: corpus too small for data.seq_len={spec.seq_len}: {len(train)} training and "
                        f"{len(val)} validation bytes (each needs at least {need})")
    return ByteCorpus(train, val, len(train_parts), len(val_parts))
