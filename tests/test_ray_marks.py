"""The `ray` mark that keeps the suite's Ray tests in one pytest-xdist worker (tests/conftest.py): the
scheduler reads it from the source as pytest would apply it, and every test that starts a cluster in a
way the source shows carries it (a serial run also fails any unmarked test that starts a Ray session)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import _ray_marked

TESTS = Path(__file__).resolve().parent
# Calls that always start (or join) a Ray cluster, and fixtures that are one.
STARTS_RAY = re.compile(r"\b(run_job|two_node_ray_cluster|shared_ray_cluster|shared_ray_address|Cluster)\(")
RAY_FIXTURES = {"cluster", "ray_head"}


def test_marks_are_read_from_the_modules_pytestmark_and_from_each_tests_decorators(tmp_path: Path) -> None:
    whole = tmp_path / "test_whole.py"
    whole.write_text("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.ray]\ndef test_a(): pass\n")
    some = tmp_path / "test_some.py"
    some.write_text(
        "import pytest\npytestmark = pytest.mark.slow\n"
        "@pytest.mark.ray\n@pytest.mark.slow\ndef test_marked(): pass\n"
        "@pytest.mark.slow\ndef test_unmarked(): pass\n"
        "class TestGroup:\n    @pytest.mark.ray\n    def test_method(self): pass\n"
    )
    assert _ray_marked(whole)("test_a") and _ray_marked(whole)("test_anything")
    assert _ray_marked(some)("test_marked") and _ray_marked(some)("test_method")
    assert not _ray_marked(some)("test_unmarked")
    assert not _ray_marked(tmp_path / "missing.py")("test_a")


def test_every_test_that_starts_a_cluster_carries_the_ray_mark() -> None:
    unmarked = []
    for module in sorted(TESTS.rglob("test_*.py")):
        source = module.read_text()
        tree = ast.parse(source)
        helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")}
        is_marked = _ray_marked(module)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            body = ast.get_source_segment(source, node) or ""
            called = [helpers[name] for name in helpers if re.search(rf"\b{name}\(", body)]
            starts = STARTS_RAY.search(body) or any(
                STARTS_RAY.search(ast.get_source_segment(source, h) or "") for h in called
            )
            takes = RAY_FIXTURES & {a.arg for a in node.args.args}
            if (starts or takes) and not is_marked(node.name):
                unmarked.append(f"{module.relative_to(TESTS.parent)}::{node.name}")
    assert not unmarked, f"start Ray without the `ray` mark: {unmarked}"
