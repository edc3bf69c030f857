"""A small byte corpus (the stdlib's email package, ~380 KB in 29 files) so trainers here start fast."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "email"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "email", root, ignore=shutil.ignore_patterns("__pycache__"))
    return root
