"""Tensors of a `torch.save` file, read one at a time by file offset, without unpickling code.

`torch.save` writes a zip archive: `<name>/data.pkl` holds the object tree, in which every tensor is a
reference to a storage record `<name>/data/<key>` stored uncompressed. `TorchFile` unpickles the tree
with an allow-list and turns each tensor into a `TensorRef` (record, dtype, offset, shape, stride);
`read_into` then fills a caller's tensor from the record's bytes with one seek and one read. Opening a
file costs its tree; reading costs the elements asked for, whatever the file's size.

A backend's own classes stored beside its tensors (named by the caller in `records`) come back as
`Record`s: the arguments and state they were pickled with, and nothing of theirs is run. Any other
global is refused (UnsafeCheckpoint) before anything is called.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardyard.runtime.safe_load import UnsafeCheckpoint

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header (30 bytes)


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's elements lie: `offset` elements into storage record `record`."""

    record: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        return self.stride == torch.empty(self.shape, device="meta").stride()


class Record:
    """A backend's object kept as data: the arguments it was built with and the state it was given."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


# torch.save names a storage's element type by a legacy storage class (never called here)
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_TENSOR_CLASS = ("tensor class",)  # torch.Tensor or nn.Parameter, as data (a marker, not callable)


@dataclass(frozen=True)
class _Storage:
    record: str
    dtype: torch.dtype


def _tensor_ref(storage: _Storage, offset: int, shape: Any, stride: Any, *_: Any) -> TensorRef:
    return TensorRef(storage.record, storage.dtype, int(offset), tuple(shape), tuple(stride))


def _parameter(data: TensorRef, *_: Any) -> TensorRef:
    return data


def _typed(rebuild: Any, new_type: Any, args: tuple, state: Any) -> TensorRef:
    """A tensor pickled with its class (torch.Tensor, nn.Parameter): the class is dropped."""
    if rebuild is not _tensor_ref or new_type is not _TENSOR_CLASS:
        raise pickle.UnpicklingError(f"refusing to rebuild a tensor of type {new_type!r}")
    return rebuild(*args)


class _TreeUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, prefix: str, records: set[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(raw))
        self.prefix = prefix
        self.records = records

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_ref
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _parameter
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _typed
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return _TENSOR_CLASS
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch", "Size"):
            return torch.Size
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.records:
            return Record
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: checkpoints may hold data, not code")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        dtype, key = pid[1], pid[2]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {dtype!r}")
        return _Storage(f"{self.prefix}/data/{key}", dtype)


class TorchFile:
    """One `torch.save` file opened lazily: `tree` is its object tree with `TensorRef`s for tensors."""

    def __init__(self, path: Path, records: Collection[tuple[str, str]] = ()) -> None:
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._members = {info.filename: info for info in archive.infolist()}
                pkl = next(n for n in self._members if n.endswith("/data.pkl") and n.count("/") == 1)
                prefix = pkl.rsplit("/", 1)[0]
                if archive.read(f"{prefix}/byteorder").decode().strip() != "little":
                    raise ValueError("big-endian storages")
                self.tree = _TreeUnpickler(archive.read(pkl), prefix, set(records)).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, StopIteration, KeyError, ValueError, EOFError) as err:
            raise UnsafeCheckpoint(f"{self.path}: not loaded ({type(err).__name__}: {err})") from None
        self._starts: dict[str, int] = {}
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())

    def _start(self, record: str) -> int:
        """Byte offset of a storage record's data in the file (its local header read once)."""
        if record not in self._starts:
            info = self._members[record]
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsafeCheckpoint(f"{self.path}: {record} is compressed; torch.save stores records plainly")
            self._file.seek(info.header_offset)
            header = _LOCAL_HEADER.unpack(self._file.read(_LOCAL_HEADER.size))
            self._starts[record] = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
        return self._starts[record]

    def read_into(self, ref: TensorRef, out: torch.Tensor, start: int = 0) -> None:
        """Fill contiguous `out` with elements [start, start + out.numel()) of contiguous `ref`."""
        if not ref.is_contiguous() or out.dtype != ref.dtype or not out.is_contiguous():
            raise ValueError(f"{self.path}: {ref.record} read as {out.dtype} or from a strided view")
        if start < 0 or start + out.numel() > ref.numel():
            raise ValueError(f"{self.path}: elements {start}..{start + out.numel()} of a {ref.numel()}-element tensor")
        size = out.element_size()
        self._file.seek(self._start(ref.record) + (ref.offset + start) * size)
        view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        if self._file.readinto(view) != out.numel() * size:
            raise UnsafeCheckpoint(f"{self.path}: {ref.record} ends before its tensor does")

    def read(self, ref: TensorRef) -> torch.Tensor:
        out = torch.empty(ref.shape, dtype=ref.dtype)
        self.read_into(ref, out.view(-1))
        return out

    def close(self) -> None:
        self._file.close()
