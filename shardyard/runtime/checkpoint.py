"""Checkpoints: one directory holds everything needed to resume (model, optimizer, scheduler,
every rank's data-loader state, step, RNG).

Files are written under a temporary name and renamed into place, and the directory itself is
assembled under a temporary name and renamed, so a crash never leaves a half-written checkpoint
where a reader would look for a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` (torch objects) and `meta` (JSON) as `directory`, atomically."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    atomic_torch_save(state, staging / STATE_FILE)
    (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    meta = json.loads((directory / META_FILE).read_text())
    return state, meta


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / other wrappers (their state_dict keys carry a prefix)."""
    return getattr(model, "module", model)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint directory in a run (as Ray Train stores them), or None."""
    candidates = [p for p in Path(run_dir).glob("checkpoint_*") if (p / META_FILE).exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / META_FILE).read_text())["step"])
