"""Loading a checkpoint never runs code from it.

Two places in a checkpoint are pickles that the libraries we build on would unpickle with plain
`pickle` (which can call any function named in the file, e.g. `os.system`):

- torch.distributed.checkpoint's `shards/.metadata`: `FileSystemReader.read_metadata` calls
  `pickle.load`. `SafeFileSystemReader` reads it with `RestrictedUnpickler`, which resolves only the
  classes DCP metadata is made of (an allow-list), so a planted `__reduce__` fails before it runs.
- a backend's own `*.pt` partitions, loaded by its engine with `torch.load(weights_only=False)`:
  `check_torch_files` first loads each with `torch.load(weights_only=True)` plus the few state
  classes the backend names (runtime/parallel holds each backend); anything else is refused.

The tensors inside `.distcp` files are already read with `weights_only=True` by DCP, and shardyard's
own files (meta, RNG, manifest) are JSON.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from shardyard.platform.errors import UserError

DCP_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
ALLOWED_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(UserError):
    """A checkpoint file would run code (or needs a class outside the allow-list) when loaded."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only DCP metadata: its dataclasses, paths, torch sizes, dtypes, layouts and memory
    formats. Any other global (a function a `__reduce__` would call) raises before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if module in DCP_MODULES and not name.startswith("__"):
            value = super().find_class(module, name)
            if isinstance(value, type):
                return value
        elif (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: checkpoints may hold data, not code")


def read_dcp_metadata(path: Path) -> Any:
    """The DCP `.metadata` object, unpickled with the allow-list; UnsafeCheckpoint otherwise."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(io.BytesIO(f.read())).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        TypeError,
        ValueError,
        KeyError,
        MemoryError,
        UnicodeDecodeError,
    ) as err:
        raise UnsafeCheckpoint(f"{path}: not loaded ({type(err).__name__}: {err})") from None


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with the metadata unpickled by the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_torch_files(directory: Path, safe_classes: list[type] | None = None) -> None:
    """Refuse (UnsafeCheckpoint) when any `*.pt` under `directory` needs more than torch's
    weights-only allow-list plus `safe_classes` (a backend's own state classes) to load."""
    files = sorted(Path(directory).rglob("*.pt"))
    if not files:
        return
    with torch.serialization.safe_globals(safe_classes or []):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for what it refuses
                raise UnsafeCheckpoint(
                    f"{path}: not loaded ({type(err).__name__}: {str(err).splitlines()[0]})"
                ) from None


def checkpoint_code_problem(directory: Path) -> str | None:
    """Why loading `directory` could run code (None when it cannot): the DCP metadata is checked here;
    a backend's `*.pt` partitions by `check_torch_files` just before they are loaded (they are large)."""
    metadata = Path(directory) / "shards" / ".metadata"
    if metadata.exists():
        try:
            read_dcp_metadata(metadata)
        except UnsafeCheckpoint as err:
            return str(err)
    return None
