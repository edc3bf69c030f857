"""Sharded, verified checkpoints.

A checkpoint is a directory:

    shards/          torch.distributed.checkpoint (DCP): every rank writes only its own chunks
                     (`__<rank>_0.distcp`), rank 0 the global `.metadata`; replicated tensors once
                     (or, for a backend with its own format, its own directory: runtime/parallel)
    rng-rank<r>.json each rank's RNG state (JSON: nothing in a checkpoint is unpickled as code)
    meta.json        rank 0: step, scheduler, global data position, layout
    spec.yaml        rank 0: the resolved spec (a checkpoint is self-describing for export/generate)
    manifest.json    rank 0, written LAST: size and sha256 of every other file; the commit marker

A checkpoint counts only when its manifest exists and every file matches it, so a save killed
between shards leaves the previous checkpoint the newest complete one. Every rank stages its files
locally and copies them into the stored directory; rank 0 writes the manifest once all are in
(runtime.saving, which also makes saves asynchronous and failures non-fatal). The tensors are written and read by the job's training state
(runtime.parallel.state.TrainingState); loading reshards: the target state dict comes from the
resuming job (any world size, EP degree or sharding), and DCP reads the chunks each rank needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shardyard import envvars
from shardyard.platform.run_dir import RunDir
from shardyard.runtime.safe_load import checkpoint_code_problem

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = 2


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-serialisable values (the device's own generator only)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()  # this rank's current device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ------------------------------------------------------------------------------------ writing
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digests(directory: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `directory` but the manifest."""
    out: dict[str, list] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[str(path.relative_to(directory))] = [path.stat().st_size, digest.hexdigest()]
    return out


def write_rank_files(directory: Path, meta: dict[str, Any], texts: dict[str, str] | None = None) -> None:
    """This rank's RNG state into `directory`; rank 0 also writes meta.json and `texts` (name -> content,
    e.g. the resolved spec)."""
    rank = dist.get_rank()  # the job's dims always made a process group (a world of one too)
    _write_json(directory / f"rng-rank{rank}.json", rng_state())
    if rank == 0:
        _write_json(directory / META_FILE, {"format": FORMAT, **meta})
        for name, text in (texts or {}).items():
            (directory / name).write_text(text)


def save_checkpoint(state, directory: Path, meta: dict[str, Any], texts: dict[str, str] | None = None) -> None:
    """Collective, all in this thread (tools and benchmarks; training saves go through
    runtime.saving): every rank writes its shards and RNG into `directory`; rank 0 writes meta.json,
    `texts` and, after every rank is done, the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    state.save(directory)  # runtime.parallel.state.TrainingState: the backend's own format
    write_rank_files(directory, meta, texts)
    _fsync_tree(directory)
    digests = file_digests(directory)
    gathered: list[dict[str, list]] = [digests]
    if dist.get_world_size() > 1:
        gathered = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, digests)  # file names and hashes only, never tensors
    if dist.get_rank() == 0:
        manifest = {name: entry for files in gathered for name, entry in files.items()}
        _write_json(directory / MANIFEST_FILE, {"files": manifest})
        _fsync_tree(directory)


def maybe_die_mid_save(step: int) -> None:
    """Test hook ($SHARDYARD_KILL_IN_SAVE="<step>:<marker file>"): the last rank's process exits
    abruptly once, after its files of that step are stored and before the manifest exists (with
    checkpoint.async, in the background write while training goes on)."""
    hook = os.environ.get(envvars.KILL_IN_SAVE)
    if not hook or dist.get_rank() != dist.get_world_size() - 1:  # (save_checkpoint's process group)
        return
    at, marker = hook.split(":", 1)
    if int(at) == step and not Path(marker).exists():
        Path(marker).write_text(str(step))
        os._exit(17)


def maybe_stall_save(step: int) -> None:
    """Test hook ($SHARDYARD_STALL_IN_SAVE="<step>:<seconds>"): every rank's write of that step hangs
    that long before its files are stored, as on a stalled filesystem."""
    hook = os.environ.get(envvars.STALL_IN_SAVE)
    if hook and int(hook.split(":")[0]) == step:
        time.sleep(float(hook.split(":")[1]))


# ------------------------------------------------------------------------------------ reading
def verify_checkpoint(directory: Path, full: bool = True) -> str | None:
    """None when `directory` is a complete checkpoint, else why not. `full` also checks hashes."""
    manifest_file = Path(directory) / MANIFEST_FILE
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return "unreadable manifest"
    for name, (size, _sha) in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    if full:
        actual = file_digests(Path(directory))
        for name, (_size, sha) in files.items():
            if actual[name][1] != sha:
                return f"{name} does not match its sha256 in the manifest"
    return checkpoint_code_problem(Path(directory))


def local_checkpoint_dir(checkpoint: Any) -> Path:
    """A Ray Train checkpoint as a local directory: its own path on a local filesystem, else a copy
    downloaded from object storage (checkpoint.dir: s3://...) into a temporary directory."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="shardyard-resume-")) / Path(checkpoint.path).name
    checkpoint.to_directory(str(target))
    return target


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def checkpoints_newest_first(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint_* with a readable meta.json, newest first."""
    found = []
    for path in RunDir(Path(run_dir)).checkpoints():
        try:
            found.append((int(read_meta(path)["step"]), path))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


def find_latest_checkpoint(run_dir: Path, full: bool = False, report=None) -> Path | None:
    """Newest complete (manifest-verified) checkpoint of a run, or None. Incomplete newer ones are
    skipped; `report(message)` hears about each (unreadable meta.json included)."""
    if report is not None:
        readable = {path for _, path in checkpoints_newest_first(run_dir)}
        for path in sorted(set(RunDir(Path(run_dir)).checkpoints()) - readable, reverse=True):
            if path.is_dir():
                report(f"skipping {path.name}: {META_FILE} is missing or unreadable")
    for _, path in checkpoints_newest_first(run_dir):
        problem = verify_checkpoint(path, full=full)
        if problem is None:
            return path
        if report is not None:
            report(f"skipping {path.name}: {problem}")
    return None


def load_checkpoint(state, directory: Path) -> dict[str, Any]:
    """Collective: load `directory` into the job's training state (runtime.parallel.state; resharding
    as its format allows); restore this rank's RNG when the world size is unchanged, else start a stream
    of its own (seed_rng_after_resize). Returns the checkpoint's meta."""
    meta = read_meta(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = meta["layout"]
    state.load(Path(directory), layout)
    rng_file = Path(directory) / f"rng-rank{rank}.json"
    if layout.get("world") == world and rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    elif (Path(directory) / "rng-rank0.json").exists():
        seed_rng_after_resize(Path(directory), rank)
    return meta


def seed_rng_after_resize(directory: Path, rank: int) -> None:
    """A resume at another world size: no saved stream belongs to this rank. Each rank's generators
    start a stream of their own, derived from the saved rank-0 state and this rank, so no rank replays
    the draws the run began with (which the seed alone would) and a rerun draws the same again."""
    digest = hashlib.sha256((directory / "rng-rank0.json").read_bytes() + f"/rank {rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1
    torch.manual_seed(seed)  # every device's generator too
    np.random.seed(seed % 2**32)
    random.seed(seed)
