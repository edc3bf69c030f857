"""`shardyard sync RUN`: push a run's offline wandb directories (one per attempt) as one wandb run,
and read back what an offline run file holds.

Every attempt of a job (first start, restarts, resumes) writes its own `wandb/offline-run-*`
directory under the run directory, all with the job's one run id (`wandb_id`). `wandb sync --id`
stitches them in order into that run. The offline file `run-<id>.wandb` is a LevelDB-style log
(a 7-byte header, 32 KiB blocks of chunked records, each a `wandb_internal_pb2.Record`);
`read_history` parses it with wandb's own protobuf classes, so tests and users can check what a
sync would upload without a network.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir

BLOCK = 32 * 1024
HEADER = 7  # file: ":W&B" + 2-byte magic + 1-byte version; record: crc32c (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


# wandb names an offline run "offline-run-<start time>-<run id>", and a second start of the same run id
# within the same second "<that>-1", "-2", ...
OFFLINE_RUN = re.compile(r"offline-run-(?P<start>\d{8}_\d{6})-(?P<id>[^-]+)(?:-(?P<again>\d+))?")


def offline_run_id(path: Path) -> str | None:
    """The wandb run id of an offline run directory (None: not one)."""
    match = OFFLINE_RUN.fullmatch(path.name)
    return match["id"] if match else None


def offline_runs(run_dir: Path) -> list[Path]:
    """The run's offline wandb directories, oldest first (by start time, then wandb's -N suffix)."""

    def started(path: Path) -> tuple[str, int]:
        match = OFFLINE_RUN.fullmatch(path.name)
        return (match["start"], int(match["again"] or 0)) if match else (path.name, 0)

    return sorted((p for p in RunDir(run_dir).wandb.glob("offline-run-*") if p.is_dir()), key=started)


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a wandb run file")
    out: list[bytes] = []
    pending = b""
    position = HEADER
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            position += left_in_block
            continue
        body = data[position + HEADER : position + HEADER + length]
        if len(body) < length:
            break  # the writer was cut off mid-record
        position += HEADER + length
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
            pending = b""
    return out


def read_history(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(run id, the logged rows in order, each a dict of key -> value) of an offline `run-<id>.wandb`."""
    from wandb.proto import wandb_internal_pb2

    run_id, rows = "", []
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a damaged record: skip it, as wandb sync does
            continue
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except ValueError:
                    row[key] = item.value_json
            rows.append(row)
    return run_id, rows


def _project(run_dir: Path) -> str:
    spec_file = RunDir(run_dir).spec_file
    if spec_file.exists():
        from shardyard.platform.spec import load_spec

        try:
            return load_spec(spec_file).tracking.wandb_project
        except UserError:
            pass
    return "shardyard"


def sync_command(run_dir: Path, project: str | None = None, entity: str | None = None) -> list[str]:
    """The `wandb sync` invocation that uploads every attempt of the run into its one run id."""
    id_file = RunDir(run_dir).wandb_id
    runs = offline_runs(run_dir)
    if not id_file.exists() or not runs:
        raise UserError(
            f"{run_dir}: no offline wandb runs to sync (is it a run directory of a job with tracking.mode: offline?)"
        )
    wandb_bin = Path(sys.executable).with_name("wandb")
    executable = str(wandb_bin) if wandb_bin.exists() else (shutil.which("wandb") or "wandb")
    command = [executable, "sync", "--id", id_file.read_text().strip(), "--project", project or _project(run_dir)]
    if entity:
        command += ["--entity", entity]
    return command + [str(p) for p in runs]


def has_credentials() -> bool:
    """An API key in the environment, or a ~/.netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def sync_run(run_dir: Path, project: str | None = None, entity: str | None = None) -> int:
    command = sync_command(run_dir, project, entity)
    if not has_credentials():
        raise UserError(
            "no wandb credentials: run `wandb login` (or set WANDB_API_KEY) on a machine with a "
            f"network, then `shardyard sync {run_dir}`; nothing was uploaded"
        )
    print(
        f"syncing {len(offline_runs(run_dir))} offline run(s) of {run_dir.name} into wandb run "
        f"{command[command.index('--id') + 1]}...",
        flush=True,
    )
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise UserError("wandb sync failed:\n  " + "\n  ".join(tail))
    print(proc.stdout.strip())
    return 0
