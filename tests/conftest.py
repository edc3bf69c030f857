"""Shared test set-up: Triton's CPU interpreter, hermetic Ray auth token, offline wandb; tests that
start Ray run in one pytest-xdist worker."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Triton reads this when it is first imported, and test modules ask at import time which grouped
# GEMM backends run here: set it before pytest imports any of them. Triton kernels then run on CPU
# tensors (correctness only; speed needs a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Two pytest-xdist workers share 2 cores: one torch thread each, not two that contend.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# Tests that start a Ray cluster (or a `shardyard run` that embeds one) carry the `ray` mark. Under
# pytest-xdist (`-n 2`, the README's command) they all run in one worker, one after another, while the
# other worker takes the rest: two Ray heads at once on one machine contend for Ray's default dashboard
# and agent ports. (xdist's own `--dist loadgroup` reads groups from node ids, which pytest 9 no longer
# lets a plugin change; xdist's controller sees node ids only, so the marks are read from the source.)
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath
    marked: dict[str, Callable[[str], bool]] = {}

    class RayTestsInOneWorker(LoadScopeScheduling):
        """One work unit of every test marked `ray` (handed out first: xdist orders units by size);
        every other test is a unit of its own."""

        def _split_scope(self, nodeid: str) -> str:
            module, _, name = nodeid.partition("::")
            if module not in marked:
                marked[module] = _ray_marked(root / module)
            return "ray" if marked[module](name.rsplit("::", 1)[-1].split("[", 1)[0]) else nodeid

    return RayTestsInOneWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray tests that kill nodes run last: in the Ray tests' worker they then run once the other
    worker is done, on an otherwise idle machine (node deaths are detected from heartbeats)."""
    items.sort(key=lambda item: item.get_closest_marker("kills_nodes") is not None)


def _ray_marked(module: Path) -> Callable[[str], bool]:
    """Whether the test function of that name in `module` carries the `ray` mark (its module's
    `pytestmark` or its own decorators)."""
    if module.suffix != ".py" or not module.is_file():
        return lambda name: False
    source = module.read_text()
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            if "pytest.mark.ray" in (ast.get_source_segment(source, node.value) or ""):
                return lambda name: True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            ast.get_source_segment(source, d) == "pytest.mark.ray" for d in node.decorator_list
        ):
            names.add(node.name)
    return names.__contains__


def _ray_sessions() -> set[str]:
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    try:
        return {entry.name for entry in root.iterdir() if entry.name.startswith("session_2")}
    except OSError:
        return set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_SESSIONS_BEFORE] = _ray_sessions()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """An unmarked test that started Ray fails (checked when tests run in one process: under xdist the
    other worker's sessions would show up here too)."""
    outcome = yield
    if call.when != "teardown" or "PYTEST_XDIST_WORKER" in os.environ or item.get_closest_marker("ray"):
        return
    started = _ray_sessions() - item.stash.get(_SESSIONS_BEFORE, set())
    report = outcome.get_result()
    if started and report.outcome == "passed":
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started a Ray cluster ({', '.join(sorted(started))}) without the `ray` mark: "
            "mark it (@pytest.mark.ray) so that pytest-xdist runs it in the Ray tests' worker"
        )


_SESSIONS_BEFORE = pytest.StashKey[set[str]]()
