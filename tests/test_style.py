"""The tree passes the formatter and the linter configured in pyproject.toml (ruff), as CI requires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"
TREES = ["shardyard", "tests", "benchmarks"]


def test_ruff_lint_passes() -> None:
    done = subprocess.run([str(RUFF), "check", *TREES], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_the_tree_unchanged() -> None:
    done = subprocess.run([str(RUFF), "format", "--check", *TREES], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
