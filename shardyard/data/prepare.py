"""`shardyard prepare`: sources -> tokenizer -> fixed-size token shards + index + fingerprint.

Layout of `<data.prepared_dir>/<key>/` (key: a hash of the input fingerprint, so a changed file,
tokenizer or split makes a new directory and an unchanged one is found and reused):

    train-00000.bin ...   val-00000.bin ...   raw uint8 / uint16 / uint32 token ids
    token_bytes.npy       bytes each token id covers (bits per byte)
    tokenizer.json        the HF tokenizer (not for bytes)
    index.json            shards, token and byte counts, per-source ranges, the fingerprint: written
                          last, it marks the directory complete

Units (files) are tokenized in parallel with Ray Data when a Ray cluster is connected (tasks spread
over its nodes, results come back through the object store), else in a plain loop; either way the
driver writes the shards in unit order, so the bytes do not depend on who tokenized what. Everything
is written under a temporary name and renamed (uploaded, for object storage, index.json last):
a failure leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardyard.data.shards import ShardedTokens
from shardyard.data.sources import Unit, document_is_validation, documents, resolve_units, source_list
from shardyard.data.storage import filesystem, join
from shardyard.data.tokenize import Tokenizer, read_tokenizer_file, train_bpe
from shardyard.platform.errors import UserError
from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.schema import DataSpec

FORMAT_VERSION = 1
INDEX = "index.json"
BPE_TRAIN_BYTES = 256 * 1024**2  # BPE learns its merges from at most this much training text
ENCODE_BATCH_BYTES = 8 * 1024**2
BLOCK_BYTES = 16 * 1024**2  # input bytes per Ray Data task (at least 2 tasks per CPU of the cluster)


# ------------------------------------------------------------------------------------- locations
def cache_root(data: DataSpec) -> Path:
    return Path(data.cache_dir).expanduser() if data.cache_dir else Path.home() / ".cache" / "shardyard"


def prepared_root(data: DataSpec) -> str:
    """data.prepared_dir (local path or URL), default <cache>/prepared."""
    if data.prepared_dir:
        return data.prepared_dir if is_remote(data.prepared_dir) else str(local_path(data.prepared_dir).absolute())
    return str(cache_root(data) / "prepared")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (one builder per node; the others wait, then find the result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------- fingerprint
def input_fingerprint(data: DataSpec, units: list[Unit]) -> dict[str, Any]:
    """What the prepared data depends on: the files (key, location, size, change stamp), tokenizer,
    split and shard size. Its hash names the prepared directory."""
    files = hashlib.sha256()
    for u in units:
        files.update(f"{u.key}|{u.location}|{u.format}|{u.text_field}|{u.size}|{u.stamp}\n".encode())
    tokenizer_sha = None
    if data.tokenizer.endswith(".json"):
        tokenizer_sha = hashlib.sha256(read_tokenizer_file(data.tokenizer).encode()).hexdigest()
    config = {
        "version": FORMAT_VERSION,
        "files_sha256": files.hexdigest(),
        "files": len(units),
        "file_bytes": sum(u.size for u in units),
        "tokenizer": data.tokenizer,
        "tokenizer_sha256": tokenizer_sha,
        "val_fraction": data.val_fraction,
        "max_bytes": data.max_bytes,
        "shard_tokens": data.shard_tokens,
    }
    config["key"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return config


# --------------------------------------------------------------------------------- prepared data
@dataclass
class PreparedData:
    """An opened prepared directory: memory-mapped train / val token streams and what they mean."""

    directory: Path
    index: dict[str, Any]
    train: ShardedTokens
    val: ShardedTokens
    token_bytes: np.ndarray  # int32 [vocab]: bytes each token covers

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes per training token (1.0 for bytes): turns token rates and losses into byte ones."""
        split = self.index["splits"]["train"]
        return split["bytes"] / max(split["tokens"], 1)

    def fingerprint(self, seq_len: int) -> dict[str, Any]:
        """Files hash, byte and token counts, and the training windows at `seq_len` (for resume checks)."""
        fp = dict(self.index["fingerprint"])
        fp["windows"] = (len(self.train) - 1) // seq_len
        return fp

    def val_offsets(self) -> np.ndarray:
        offsets = np.asarray(self.index["val_unit_offsets"], dtype=np.int64)
        return offsets if len(offsets) else np.zeros(1, dtype=np.int64)

    def source_ranges(self) -> list[tuple[str, float, int, int]]:
        """(name, weight, start, stop) of each source's tokens in the training stream."""
        end = len(self.train)
        return [
            (s["name"], float(s["weight"]), min(int(s["train"][0]), end), min(int(s["train"][1]), end))
            for s in self.index["sources"]
        ]

    def tokenizer(self) -> Tokenizer:
        path = self.directory / "tokenizer.json"
        if not path.exists():
            return Tokenizer.bytes()
        return Tokenizer.from_json(path.read_text(), self.vocab_size)


def _open_local(directory: Path) -> PreparedData:
    index = json.loads((directory / INDEX).read_text())
    dtype = np.dtype(index["dtype"])
    splits = {}
    for name in ("train", "val"):
        paths = []
        for shard in index["splits"][name]["shards"]:
            path = directory / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                raise UserError(
                    f"data.prepared_dir: {path} is missing or not {expected} bytes long: the prepared data is "
                    f"damaged; delete {directory} and run `shardyard prepare` again"
                )
            paths.append(path)
        splits[name] = ShardedTokens.open(paths, dtype)
    token_bytes = np.load(directory / "token_bytes.npy")
    train, val = splits["train"], splits["val"]
    if index.get("val_cut") is not None:  # validation is the tail of the one stream
        cut = int(index["val_cut"])
        train, val = train.view(0, cut), train.view(cut, len(train))
    return PreparedData(directory, index, train, val, token_bytes)


def _download(remote_dir: str, local_dir: Path) -> None:
    """Copy a complete remote prepared directory to this node (index.json last), atomically."""
    fs, path = filesystem(remote_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
    try:
        names = sorted(Path(p).name for p in fs.ls(path, detail=False))
        for name in [n for n in names if n != INDEX] + [INDEX]:
            fs.get(f"{path}/{name}", str(staging / name))
        os.replace(staging, local_dir) if not local_dir.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_prepared(data: DataSpec, key: str | None = None) -> PreparedData | None:
    """The prepared data for `data` if it exists (None if not). Remote prepared data is first copied
    to this node's cache once (under a lock), so training only ever memory-maps local files."""
    if key is None:
        key = input_fingerprint(data, resolve_units(data))["key"]
    root = prepared_root(data)
    if not is_remote(root):
        directory = Path(root) / key
        return _open_local(directory) if (directory / INDEX).exists() else None
    local = cache_root(data) / "prepared-remote" / key
    with file_lock(local.parent / f".{key}.lock"):
        if not (local / INDEX).exists():
            fs, path = filesystem(join(root, key, INDEX))
            fs.invalidate_cache()
            if not fs.exists(path):
                return None
            local.parent.mkdir(parents=True, exist_ok=True)
            _download(join(root, key), local)
    return _open_local(local)


# ------------------------------------------------------------------------------------- tokenizing
@dataclass
class UnitTokens:
    unit: int
    train: np.ndarray
    val: np.ndarray
    train_bytes: int
    val_bytes: int
    node: str = ""


def _encode_all(tokenizer: Tokenizer, docs: Iterator[bytes]) -> tuple[np.ndarray, int]:
    pieces, batch, batch_bytes, total = [], [], 0, 0
    for doc in docs:
        batch.append(doc)
        batch_bytes += len(doc)
        total += len(doc)
        if batch_bytes >= ENCODE_BATCH_BYTES:
            pieces.extend(tokenizer.encode(batch))
            batch, batch_bytes = [], 0
    if batch:
        pieces.extend(tokenizer.encode(batch))
    tokens = np.concatenate(pieces).astype(tokenizer.dtype, copy=False) if pieces else np.zeros(0, tokenizer.dtype)
    return tokens, total


def tokenize_unit(index: int, unit: Unit, tokenizer: Tokenizer, val_fraction: float) -> UnitTokens:
    """One unit's documents, split into train / val by their keys, tokenized."""
    train_docs, val_docs = [], []
    for row, doc in documents(unit, need_text=not tokenizer.is_bytes):
        (val_docs if document_is_validation(unit, row, val_fraction) else train_docs).append(doc)
    train, train_bytes = _encode_all(tokenizer, iter(train_docs))
    val, val_bytes = _encode_all(tokenizer, iter(val_docs))
    return UnitTokens(index, train, val, train_bytes, val_bytes)


def _training_texts(units: list[Unit], val_fraction: float) -> Iterator[str]:
    """Training-split documents as text, up to BPE_TRAIN_BYTES (the tokenizer never sees validation text)."""
    seen = 0
    for unit in units:
        for row, doc in documents(unit, need_text=True):
            if document_is_validation(unit, row, val_fraction):
                continue
            yield doc.decode("utf-8")
            seen += len(doc)
            if seen >= BPE_TRAIN_BYTES:
                return


def build_tokenizer(data: DataSpec, units: list[Unit]) -> Tokenizer:
    if data.tokenizer == "bytes":
        return Tokenizer.bytes()
    if data.tokenizer.startswith("bpe:"):
        return train_bpe(_training_texts(units, data.val_fraction), int(data.tokenizer[4:]))
    return Tokenizer.from_json(read_tokenizer_file(data.tokenizer))


def _tokenize_local(units: list[Unit], tokenizer: Tokenizer, val_fraction: float) -> Iterator[UnitTokens]:
    for i, unit in enumerate(units):
        yield tokenize_unit(i, unit, tokenizer, val_fraction)


def _tokenize_ray(units: list[Unit], tokenizer: Tokenizer, val_fraction: float) -> Iterator[UnitTokens]:
    """Ray Data over the units: one task per unit, spread over the cluster's nodes; token arrays come
    back to the driver through the object store (so no shared filesystem is needed)."""
    import pyarrow as pa
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    vocab, hf_json = tokenizer.vocab_size, tokenizer.hf_json

    def tokenize_batch(batch: pa.Table) -> pa.Table:
        worker_tokenizer = Tokenizer(vocab, hf_json)
        node = ray.get_runtime_context().get_node_id()
        rows: dict[str, list] = {"unit": [], "train": [], "val": [], "train_bytes": [], "val_bytes": [], "node": []}
        for i in batch.column("unit").to_pylist():
            result = tokenize_unit(i, units[i], worker_tokenizer, val_fraction)
            for name, value in (
                ("unit", i),
                ("train", result.train.tobytes()),
                ("val", result.val.tobytes()),
                ("train_bytes", result.train_bytes),
                ("val_bytes", result.val_bytes),
                ("node", node),
            ):
                rows[name].append(value)
        return pa.table(
            {
                "unit": pa.array(rows["unit"], pa.int64()),
                "train": pa.array(rows["train"], pa.large_binary()),
                "val": pa.array(rows["val"], pa.large_binary()),
                "train_bytes": pa.array(rows["train_bytes"], pa.int64()),
                "val_bytes": pa.array(rows["val_bytes"], pa.int64()),
                "node": pa.array(rows["node"], pa.string()),
            }
        )

    # Blocks of units, not one task per file: enough blocks to keep every CPU busy (x2 for balance) and
    # about BLOCK_BYTES of input each, so a corpus of many small files does not drown in task overhead.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = min(len(units), max(2 * cpus, sum(u.size for u in units) // BLOCK_BYTES))
    dataset = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=blocks)
    dataset = dataset.map_batches(tokenize_batch, batch_size=None, batch_format="pyarrow", num_cpus=1)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            yield UnitTokens(
                row["unit"],
                np.frombuffer(row["train"], tokenizer.dtype),
                np.frombuffer(row["val"], tokenizer.dtype),
                row["train_bytes"],
                row["val_bytes"],
                row["node"],
            )


# ------------------------------------------------------------------------------------- assembling
class ShardWriter:
    """Cuts one split's token stream into fixed-size shard files."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.directory, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self.handle = None
        self.in_shard = 0
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.handle is None or self.in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self.in_shard)
            self.handle.write(tokens[:take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.in_shard += take
            self.tokens += take
            self.shards[-1]["tokens"] = self.in_shard
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.handle = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self.in_shard = 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


@dataclass
class PrepareReport:
    """What a prepare call did, for the CLI, the benchmark and tests."""

    directory: str
    skipped: bool  # found complete (idempotent second call)
    seconds: float = 0.0
    input_bytes: int = 0
    tokens: int = 0
    units_per_node: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def _progress(total_bytes: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not show,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _write_prepared(
    staging: Path,
    data: DataSpec,
    units: list[Unit],
    tokenizer: Tokenizer,
    fingerprint: dict[str, Any],
    results: Iterator[UnitTokens],
    show_progress: bool,
    report: PrepareReport,
) -> None:
    parts = staging / "parts"
    parts.mkdir()
    val_tokens: dict[int, int] = {}
    split_bytes = {"train": 0, "val": 0}
    with _progress(sum(u.size for u in units), show_progress) as bar:
        for result in results:  # any order: each unit's tokens go to its own part file
            result.train.tofile(parts / f"{result.unit}.train")
            result.val.tofile(parts / f"{result.unit}.val")
            val_tokens[result.unit] = len(result.val)
            split_bytes["train"] += result.train_bytes
            split_bytes["val"] += result.val_bytes
            report.units_per_node[result.node or "local"] = report.units_per_node.get(result.node or "local", 0) + 1
            bar.update(units[result.unit].size)
    writers = {s: ShardWriter(staging, s, data.shard_tokens, tokenizer.dtype) for s in ("train", "val")}
    sources = [
        {"name": s.path, "weight": s.weight, "train": [0, 0], "val": [0, 0], "files": 0} for s in source_list(data)
    ]
    val_unit_offsets = []
    for i, unit in enumerate(units):  # unit order: the same bytes whoever tokenized
        src = sources[unit.source]
        if src["files"] == 0:
            src["train"][0], src["val"][0] = writers["train"].tokens, writers["val"].tokens
        if val_tokens[i]:
            val_unit_offsets.append(writers["val"].tokens)
        for split in ("train", "val"):
            writers[split].write(np.fromfile(parts / f"{i}.{split}", dtype=tokenizer.dtype))
        src["files"] += 1
        src["train"][1], src["val"][1] = writers["train"].tokens, writers["val"].tokens
    for writer in writers.values():
        writer.close()
    shutil.rmtree(parts)
    if writers["train"].tokens == 0:
        raise UserError(
            f"data: the training split is empty ({len(units)} files, data.val_fraction {data.val_fraction}); "
            "add documents or lower data.val_fraction"
        )
    val_cut = None
    if writers["val"].tokens == 0:  # e.g. one long document: hold out the tail of the stream, as data.paths does
        val_cut = int(writers["train"].tokens * (1 - data.val_fraction))
        val_unit_offsets = [0]
    np.save(staging / "token_bytes.npy", tokenizer.token_byte_lengths())
    if tokenizer.hf_json is not None:
        (staging / "tokenizer.json").write_text(tokenizer.hf_json)
    out_fingerprint = {
        **fingerprint,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_bytes": split_bytes["train"],
        "val_bytes": split_bytes["val"],
    }
    index = {
        "version": FORMAT_VERSION,
        "dtype": tokenizer.dtype.str,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": data.tokenizer,
        "shard_tokens": data.shard_tokens,
        "splits": {s: {"shards": w.shards, "tokens": w.tokens, "bytes": split_bytes[s]} for s, w in writers.items()},
        "sources": sources,
        "val_unit_offsets": val_unit_offsets,
        "val_cut": val_cut,
        "fingerprint": out_fingerprint,
    }
    (staging / INDEX).write_text(json.dumps(index, indent=1))
    report.tokens = writers["train"].tokens + writers["val"].tokens


def prepare(data: DataSpec, parallel: str = "auto", show_progress: bool = False) -> PrepareReport:
    """Prepare `data` unless already prepared. parallel: auto (Ray Data when a Ray cluster is connected)
    | ray | local (one process)."""
    start = time.perf_counter()
    units = resolve_units(data)
    fingerprint = input_fingerprint(data, units)
    key, root = fingerprint["key"], prepared_root(data)
    final = join(root, key)
    if open_prepared(data, key) is not None:
        return PrepareReport(final, skipped=True)
    use_ray = parallel == "ray"
    if parallel == "auto":
        import importlib.util

        use_ray = (
            "ray" in sys.modules and importlib.util.find_spec("ray") is not None and sys.modules["ray"].is_initialized()
        )
    report = PrepareReport(final, skipped=False, input_bytes=sum(u.size for u in units))
    staging_parent = Path(root) if not is_remote(root) else cache_root(data) / "staging"
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=staging_parent))
    try:
        tokenizer = build_tokenizer(data, units)
        tokenize = _tokenize_ray if use_ray else _tokenize_local
        _write_prepared(
            staging,
            data,
            units,
            tokenizer,
            fingerprint,
            tokenize(units, tokenizer, data.val_fraction),
            show_progress,
            report,
        )
        _publish(staging, root, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _publish(staging: Path, root: str, key: str) -> None:
    """Make the prepared directory visible in one step (rename; for object storage: upload, index last)."""
    if not is_remote(root):
        try:
            os.rename(staging, Path(root) / key)
        except OSError:  # another process published the same key first: keep theirs
            if not (Path(root) / key / INDEX).exists():
                raise
        return
    fs, path = filesystem(join(root, key))
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != INDEX] + [INDEX]:
        fs.put_file(str(staging / name), f"{path}/{name}")


def ensure_prepared(data: DataSpec, parallel: str = "auto", show_progress: bool = False) -> PreparedData:
    """The prepared data, preparing it first (once per node: under a lock) if missing."""
    units = resolve_units(data)
    key = input_fingerprint(data, units)["key"]
    found = open_prepared(data, key)
    if found is not None:
        return found
    with file_lock(cache_root(data) / "locks" / f"prepare-{key}.lock"):
        found = open_prepared(data, key)
        if found is None:
            prepare(data, parallel, show_progress)
            found = open_prepared(data, key)
    assert found is not None
    return found
