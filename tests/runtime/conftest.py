"""The uninterrupted run the fault tests of this package compare with (tests/runtime/fault_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec
from tests.helpers import run_cli, train_losses, train_on_gloo
from tests.runtime.fault_runs import fault_spec


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's directory: the Trainer on 2 gloo ranks without Ray (what Ray Train runs
    is the same code on the same kind of process group; no worker group to start)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    spec = fault_spec(root)
    train_on_gloo(load_spec(spec), root / "runs" / "clean", 2)
    again = run_cli("run", str(spec))  # a finished job run again has nothing left to do
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:]
    losses = train_losses(root / "runs" / "clean")
    assert sorted(losses) == list(range(1, 13))
    return root / "runs" / "clean"
