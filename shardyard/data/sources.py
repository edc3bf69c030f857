"""Data sources -> units of work -> documents.

A *unit* is one file (plain text, JSONL, Parquet) or one saved Hugging Face dataset directory of one
source; `shardyard prepare` tokenizes units in parallel. A unit yields *documents*: a plain file is
one document (its bytes), a JSONL line / Parquet row / dataset row is one (its `text_field` plus a
newline, so rows do not run into each other). Which split a document lands in is decided by a hash
of its stable key (file key, plus the row for row formats), the same on every machine.

Every problem with the input is a UserError naming the source field, the file and, for row formats,
the row (1-based line for JSONL, 0-based row for Parquet / datasets).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardyard.data.corpus import STDLIB, is_validation, stdlib_root
from shardyard.data.storage import filesystem, protocol_of
from shardyard.platform.errors import UserError
from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.schema import DataSpec, SourceSpec

ROW_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
HF_MARKERS = ("dataset_info.json", "state.json")
SKIP_PARTS = {"site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class Unit:
    """One file (or saved dataset) of one source: the grain of parallel tokenization."""

    source: int  # index into the source list
    location: str  # local path or URL
    key: str  # stable key: ordering, the train/val split, the fingerprint
    format: str  # text | jsonl | parquet | hf
    text_field: str
    size: int  # bytes on storage
    stamp: str  # change marker for the fingerprint (mtime in ns, or the object's ETag)
    named: bool  # the source names this file itself (an empty one is then an error)

    def field(self) -> str:
        return f"data.sources[{self.source}]"


def source_list(data: DataSpec) -> list[SourceSpec]:
    """data.sources, or data.paths as plain-text sources of weight 1 (one source: no mixture)."""
    if data.sources is not None:
        if not data.sources:
            raise UserError("data.sources: give at least one source (or leave it out to use data.paths)")
        return list(data.sources)
    return [SourceSpec(path=p, format="text") for p in data.paths]


def _format_of(name: str, declared: str) -> str:
    if declared != "auto":
        return declared
    return ROW_SUFFIXES.get(Path(name).suffix, "text")


def _keeps(name: str, declared: str, extensions: list[str]) -> bool:
    """Which files of a directory belong to a source of format `declared`."""
    suffix = Path(name).suffix
    if declared == "jsonl":
        return suffix in (".jsonl", ".json", ".ndjson")
    if declared == "parquet":
        return suffix == ".parquet"
    if declared == "auto" and suffix in (".jsonl", ".ndjson", ".parquet"):
        return True
    return "*" in extensions or suffix in extensions


def _local_units(index: int, spec: SourceSpec, data: DataSpec) -> list[Unit]:
    entry = spec.path
    root = stdlib_root() if entry == STDLIB else local_path(entry)

    def unit(path: Path, key: str, named: bool) -> Unit:
        st = path.stat()
        return Unit(
            index,
            str(path),
            f"s{index}/{key}",
            _format_of(path.name, spec.format),
            spec.text_field,
            st.st_size,
            str(st.st_mtime_ns),
            named,
        )

    if root.is_dir():
        if spec.format == "hf" or (spec.format == "auto" and any((root / m).exists() for m in HF_MARKERS)):
            files = sorted(p for p in root.rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in files)
            stamp = ",".join(str(p.stat().st_mtime_ns) for p in files)
            return [Unit(index, str(root), f"s{index}/{root.name}", "hf", spec.text_field, size, stamp, True)]
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and not SKIP_PARTS.intersection(p.relative_to(root).parts)
            and _keeps(p.name, spec.format, data.extensions)
        )
        return [unit(p, str(p.relative_to(root)), False) for p in files]
    if root.is_file():
        return [unit(root, root.name, True)]
    matches = [Path(m) for m in sorted(glob.glob(str(root), recursive=True))]
    return [unit(p, str(p), False) for p in matches if p.is_file()]


def _remote_units(index: int, spec: SourceSpec, data: DataSpec) -> list[Unit]:
    fs, path = filesystem(spec.path)
    fs.invalidate_cache()  # fsspec instances are cached per process: list what is there now
    scheme = protocol_of(spec.path)

    def unit(info: dict[str, Any], key: str, named: bool) -> Unit:
        name = info["name"]
        stamp = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        return Unit(
            index,
            f"{scheme}://{name}",
            f"s{index}/{key}",
            _format_of(name, spec.format),
            spec.text_field,
            int(info.get("size") or 0),
            stamp,
            named,
        )

    if any(c in path for c in "*?["):
        infos = fs.glob(path, detail=True)
        return [unit(info, name, False) for name, info in sorted(infos.items()) if info.get("type") == "file"]
    if fs.isfile(path):
        return [unit(fs.info(path), Path(path).name, True)]
    if fs.isdir(path):
        infos = fs.find(path, detail=True)
        if spec.format == "hf":
            size = sum(int(i.get("size") or 0) for i in infos.values())
            stamp = ",".join(str(i.get("ETag") or "") for _, i in sorted(infos.items()))
            return [Unit(index, spec.path, f"s{index}/{Path(path).name}", "hf", spec.text_field, size, stamp, True)]
        return [
            unit(info, name[len(path) :].lstrip("/"), False)
            for name, info in sorted(infos.items())
            if _keeps(name, spec.format, data.extensions)
        ]
    return []


def resolve_units(data: DataSpec) -> list[Unit]:
    """Every unit of every source in a stable order, cut at data.max_bytes (whole units, as data.paths)."""
    units: list[Unit] = []
    for index, spec in enumerate(source_list(data)):
        found = _remote_units(index, spec, data) if is_remote(spec.path) else _local_units(index, spec, data)
        if not found:
            field = f"data.sources[{index}].path" if data.sources is not None else "data.paths"
            raise UserError(
                f"{field}: {spec.path!r} matches no file or directory"
                + ("" if spec.format in ("jsonl", "parquet", "hf") else f" with extensions {data.extensions}")
            )
        units.extend(sorted(found, key=lambda u: u.key))
    if data.max_bytes is not None:
        kept, total = [], 0
        for unit in units:
            if total >= data.max_bytes:
                break
            kept.append(unit)
            total += unit.size
        units = kept
    return units


# ------------------------------------------------------------------------------------- documents
def _open(location: str):
    if is_remote(location):
        fs, path = filesystem(location)
        return fs.open(path, "rb")
    return open(local_path(location), "rb")


def _row_text(unit: Unit, value: Any, where: str) -> bytes:
    if value is None:
        raise UserError(f"{unit.field()}: {unit.location}: {where}: text field {unit.text_field!r} is empty (null)")
    if not isinstance(value, str):
        raise UserError(
            f"{unit.field()}: {unit.location}: {where}: text field {unit.text_field!r} holds "
            f"{type(value).__name__}, not a string"
        )
    return (value + "\n").encode("utf-8")


def _jsonl_documents(unit: Unit) -> Iterator[tuple[int, bytes]]:
    rows = 0
    with _open(unit.location) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{unit.field()}: {unit.location}: line {line_no}: not UTF-8 ({err.reason} at byte "
                    f"{err.start} of the line)"
                ) from None
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{unit.field()}: {unit.location}: line {line_no}: not valid JSON ({err.msg}, column {err.colno})"
                ) from None
            if not isinstance(record, dict) or unit.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f"{unit.field()}.text_field: {unit.location}: line {line_no}: no field "
                    f"{unit.text_field!r} (the line has {keys})"
                )
            yield line_no - 1, _row_text(unit, record[unit.text_field], f"line {line_no}")
            rows += 1
    if rows == 0:
        raise UserError(f"{unit.field()}: {unit.location}: empty file (no JSON lines)")


def _parquet_documents(unit: Unit) -> Iterator[tuple[int, bytes]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(unit.location) as f:
        try:
            table_file = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{unit.field()}: {unit.location}: not a readable Parquet file ({err})") from None
        names = table_file.schema_arrow.names
        if unit.text_field not in names:
            raise UserError(
                f"{unit.field()}.text_field: {unit.location}: no column {unit.text_field!r} (columns: {names})"
            )
        if table_file.metadata.num_rows == 0:
            raise UserError(f"{unit.field()}: {unit.location}: empty file (no rows)")
        row = 0
        try:
            for batch in table_file.iter_batches(columns=[unit.text_field], batch_size=4096):
                for value in batch.column(0).to_pylist():
                    yield row, _row_text(unit, value, f"row {row}")
                    row += 1
        except pa.ArrowException as err:
            raise UserError(f"{unit.field()}: {unit.location}: corrupt Parquet data after row {row} ({err})") from None


def _hf_documents(unit: Unit) -> Iterator[tuple[int, bytes]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(unit.location)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UserError(f"{unit.field()}: {unit.location}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(
            f"{unit.field()}.path: {unit.location} holds a DatasetDict with splits {list(dataset)}; "
            "point the path at one split's directory"
        )
    if unit.text_field not in dataset.column_names:
        raise UserError(
            f"{unit.field()}.text_field: {unit.location}: no column {unit.text_field!r} "
            f"(columns: {dataset.column_names})"
        )
    if len(dataset) == 0:
        raise UserError(f"{unit.field()}: {unit.location}: empty dataset (no rows)")
    column = dataset.with_format("arrow")
    row = 0
    for start in range(0, len(dataset), 4096):
        for value in column[start : start + 4096][unit.text_field].to_pylist():
            yield row, _row_text(unit, value, f"row {row}")
            row += 1


def _text_documents(unit: Unit, need_text: bool) -> Iterator[tuple[int, bytes]]:
    with _open(unit.location) as f:
        content = f.read()
    if not content and unit.named:
        raise UserError(f"{unit.field()}: {unit.location}: empty file")
    if need_text:
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{unit.field()}: {unit.location}: not UTF-8 text ({err.reason} at byte {err.start}); "
                "a text tokenizer needs UTF-8 (data.tokenizer: bytes reads any file)"
            ) from None
    if content:
        yield 0, content


def documents(unit: Unit, need_text: bool) -> Iterator[tuple[int, bytes]]:
    """(row, document bytes) of a unit; `need_text`: the tokenizer reads text, so plain files must be UTF-8."""
    if unit.format == "jsonl":
        return _jsonl_documents(unit)
    if unit.format == "parquet":
        return _parquet_documents(unit)
    if unit.format == "hf":
        return _hf_documents(unit)
    return _text_documents(unit, need_text)


def document_is_validation(unit: Unit, row: int, val_fraction: float) -> bool:
    """Plain files split by file (as data.paths), row formats by row."""
    return is_validation(unit.key if unit.format == "text" else f"{unit.key}#{row}", val_fraction)
