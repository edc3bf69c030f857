"""Shared test set-up: Triton's CPU interpreter, hermetic Ray auth token, offline wandb."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Triton reads this when it is first imported, and test modules ask at import time which grouped
# GEMM backends run here: set it before pytest imports any of them. Triton kernels then run on CPU
# tensors (correctness only; speed needs a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    token_dir = tmp_path_factory.mktemp("ray-auth")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token_dir / "auth_token"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray Train's controller polls its workers every 2 s: a finished or failed group is seen up to 2 s
    # late, in every one of the suite's ~40 Ray Train runs and restarts. Ray Train passes this from the
    # driver to its controller. Its node-drain watcher (one more actor process per run) is not under test.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # `python`/`ray` of this venv


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_cluster() -> Iterator[None]:
    """Stops the Ray head that tests.helpers.run_job started, if a test started it."""
    from tests.helpers import stop_shared_ray

    yield
    stop_shared_ray()
