"""The run directory has one owner (platform/run_dir.py): where a run lives for a local, a `file://`
and an object-storage checkpoint.dir, and Ray Train's checkpoints in the same directory as the
run's other files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.data.corpus import resolve_files
from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.run_dir import RunDir
from shardyard.platform.schema import DataSpec
from shardyard.platform.spec import load_spec_text
from tests.helpers import tiny_spec_yaml


def _spec(checkpoint_dir: str):
    return load_spec_text(tiny_spec_yaml("job", Path("unused")), overrides=[f"checkpoint.dir={checkpoint_dir}"])


def test_a_file_url_is_a_local_path_for_the_run_its_checkpoints_and_its_data(tmp_path: Path) -> None:
    spec = _spec(f"file://{tmp_path}/store")
    assert not is_remote(spec.checkpoint.dir) and local_path(spec.checkpoint.dir) == tmp_path / "store"
    run = RunDir.of(spec)
    assert run.path == tmp_path / "store" / "job"
    # Ray Train's RunConfig(name, storage_path): checkpoints land in the run directory itself
    assert RunDir.checkpoint_storage(spec, run.path) == ("job", str(tmp_path / "store"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_bytes(b"hello")
    files = resolve_files(DataSpec(paths=[f"file://{tmp_path}/text"], extensions=[".txt"]))
    assert [f for f, _ in files] == [tmp_path / "text" / "a.txt"]


def test_object_storage_keeps_checkpoints_in_the_bucket_and_the_rest_local() -> None:
    spec = _spec("s3://bucket/runs")
    assert is_remote(spec.checkpoint.dir)
    run = RunDir.of(spec)
    assert run.path.is_relative_to(Path.home() / ".cache" / "shardyard" / "runs") and run.path.name == "job"
    assert RunDir.checkpoint_storage(spec, run.path) == ("job", "s3://bucket/runs")
    with pytest.raises(ValueError, match="remote URL"):
        local_path("s3://bucket/runs")


def test_a_relative_dir_is_taken_from_the_working_directory_and_any_run_dir_holds_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _spec("runs")
    assert RunDir.of(spec).path == tmp_path / "runs" / "job"
    # `submit --run-dir`: whatever the directory is called, checkpoints and metrics share it
    assert RunDir.checkpoint_storage(spec, Path("/shared/runs/custom-dir")) == ("custom-dir", "/shared/runs")
    assert RunDir.find("job") is None  # not a run until it holds its spec
    RunDir.of(spec).path.mkdir(parents=True)
    RunDir.of(spec).spec_file.write_text("name: job\n")
    assert RunDir.find("job") == RunDir.of(spec) == RunDir.find(str(tmp_path / "runs" / "job"))
