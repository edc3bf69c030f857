"""What every benchmark's `--smoke` shares: a scratch directory, a tiny trained run directory, and
whether network namespaces are available.

`--smoke` runs a benchmark's own code path at seconds-long sizes (tiny shapes, 1-2 rounds) and writes
only under a fresh temporary directory, never to benchmarks/results/. Its figures mean nothing; it
exists so that tests/benchmarks/test_smoke.py notices when a refactor breaks a benchmark.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny MoE byte LM (width 64, 4 experts top-2) on a small slice of the stdlib corpus: one worker,
# a handful of steps, a checkpoint at the end. Overrides are `shardyard run --set` syntax.
TINY_JOB = [
    "model.preset=null",
    "model.width=64",
    "model.depth=2",
    "model.heads=2",
    "model.ffn.hidden=128",
    "data.seq_len=64",
    "data.max_bytes=3000000",
    "training.steps=6",
    "training.batch_size=4",
    "training.eval_every=0",
    "training.eval_bytes=4096",
    "training.log_every=1",
    "resources.workers=1",
    "checkpoint.every=6",
    "checkpoint.keep=2",
    "tracking.mode=disabled",
]


def smoke_dir(name: str) -> Path:
    """A fresh scratch directory for one smoke run, removed at exit (kept when SHARDYARD_SMOKE_KEEP=1,
    to inspect a failing run)."""
    path = Path(tempfile.mkdtemp(prefix=f"shardyard-smoke-{name}-"))
    if os.environ.get("SHARDYARD_SMOKE_KEEP") == "1":
        print(f"smoke: writing to {path} (kept)", flush=True)
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def hermetic_ray(scratch: Path) -> None:
    """Smoke runs that start Ray use their own auth token (in the scratch directory), as the tests do,
    unless RAY_AUTH_TOKEN_PATH is set: never the user's ~/.ray/auth_token."""
    from shardyard.cluster.auth import ensure_token

    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(scratch / "ray-auth-token"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_token(generate=True)  # token mode on; a new token (mode 0600) where none is


def tiny_run_dir(scratch: Path, name: str = "smoke-run", overrides: list[str] | None = None) -> Path:
    """Train TINY_JOB (plus overrides) in this process with the workers' Trainer (train_local.py);
    return its run directory (spec.yaml, metrics.jsonl, one checkpoint)."""
    from benchmarks.train_local import train
    from shardyard.platform.spec import load_spec

    sets = [*TINY_JOB, f"name={name}", f"checkpoint.dir={scratch}", *(overrides or [])]
    spec = load_spec(ROOT / "jobs" / "moe-tiny.yaml", sets)
    return train(spec)


def netns_available() -> bool:
    """Whether this process may create network namespaces (root with `ip netns` and `tc`)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    probe = f"sy-smoke-probe-{next(tempfile._get_candidate_names())}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made
