"""The CLI as a user runs it: a subprocess, exit codes, messages without tracebacks."""

from __future__ import annotations

import importlib
import json
import subprocess
import tomllib
from pathlib import Path

from tests.helpers import ROOT, SHARDYARD, run_cli, tiny_spec_yaml


def test_validate_prints_summary() -> None:
    proc = run_cli("validate", "jobs/moe-tiny.yaml", "--set", "training.steps=50", "--set", "model.moe.num_experts=8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "spec OK" in out and "moe-tiny" in out
    assert "50 steps" in out and "8 per MoE layer" in out
    assert "active per token" in out and "run dir" in out


def test_the_console_script_is_the_cli_the_tests_run() -> None:
    """pyproject's `shardyard` script names the function `python -m shardyard.cli` (tests.helpers) runs."""
    from shardyard.cli.main import main

    module, _, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][
        "shardyard"
    ].partition(":")
    assert getattr(importlib.import_module(module), function) is main


def test_bad_spec_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmodel:\n  kind: moe\n  moe:\n    num_experts: 2\n    top_k: 3\n")
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:4" in proc.stderr and "top_k (3) must not exceed num_experts (2)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = run_cli("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "no such job spec file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("validate", "jobs/moe-tiny.yaml", "--set", "training.steps")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_bad_data_path_fails_cleanly_before_the_cluster(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(tiny_spec_yaml("nodata", tmp_path / "runs", data=f"{{paths: [{tmp_path}/none/*.txt]}}"))
    proc = run_cli("validate", str(spec))
    assert proc.returncode == 2 and "matches no file" in proc.stderr and "Traceback" not in proc.stderr


def test_schema_and_generated_reference_are_current() -> None:
    proc = run_cli("schema")
    schema = json.loads(proc.stdout)
    assert "model" in schema["properties"] and schema["additionalProperties"] is False
    md = run_cli("schema", "--markdown").stdout
    assert (ROOT / "docs" / "spec.md").read_text() == md, "regenerate: shardyard schema --markdown > docs/spec.md"


def test_submit_without_token_or_cluster_is_a_clear_error(tmp_path: Path) -> None:
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "no_token")}
    proc = run_cli("submit", "jobs/moe-tiny.yaml", "--address", "http://127.0.0.1:9", env=env, timeout=120)
    assert proc.returncode == 3 and "no Ray auth token" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "token").write_text("0" * 64)
    (tmp_path / "token").chmod(0o600)  # a token others can read is refused (tests/safety/test_security.py)
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    proc = run_cli("submit", "jobs/moe-tiny.yaml", "--address", "http://127.0.0.1:9", env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Ray cluster at http://127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr


def test_report_on_a_non_run_directory(tmp_path: Path) -> None:
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr


def test_plan_prints_all_three_algorithms_and_a_recommendation() -> None:
    proc = run_cli("plan", "jobs/moe-tiny.yaml", "--nodes", "64", "--gpus-per-node", "8")
    assert proc.returncode == 0, proc.stderr
    for algo in ("flat", "hierarchical", "leader"):
        assert algo in proc.stdout
    assert "recommendation: parallel.a2a =" in proc.stdout
    bad = run_cli("plan", "jobs/moe-tiny.yaml", "--nodes", "3", "--expert-parallel", "5")
    assert bad.returncode == 2 and "must divide" in bad.stderr


def _one_process_run(tmp_path: Path, name: str, steps: int = 3) -> Path:
    """A run directory with a real checkpoint, trained by the Trainer in this process."""
    from shardyard.platform.spec import load_spec_text, spec_to_yaml
    from shardyard.runtime.worker import LocalReporter, Trainer

    spec = load_spec_text(
        tiny_spec_yaml(name, tmp_path),
        overrides=[
            "resources.workers=1",
            f"training.steps={steps}",
            "training.eval_every=0",
            "optim.schedule.warmup=1",
        ],
    )
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))
    Trainer(spec, run_dir, LocalReporter(run_dir, 2)).fit()
    return run_dir


def test_generate_from_a_checkpoint(tmp_path: Path) -> None:
    """`shardyard generate` on a run directory written by the trainer's checkpoint code."""
    run_dir = _one_process_run(tmp_path, "gen")
    proc = subprocess.run(
        [*SHARDYARD, "generate", str(run_dir), "--prompt", "def ", "--bytes", "12"],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"def ") and len(proc.stdout) == 4 + 12 + 1
    assert b"12 bytes" in proc.stderr and b"gen" in proc.stderr
    missing = run_cli("generate", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "neither a checkpoint" in missing.stderr


def test_rerun_with_an_incompatible_spec_keeps_the_old_run(tmp_path: Path) -> None:
    """A run directory with checkpoints is never resumed by, or overwritten with, another model."""
    run_dir = _one_process_run(tmp_path / "runs", "keep", steps=2)
    text = tiny_spec_yaml("keep", tmp_path / "runs")

    def snapshot() -> dict[Path, bytes]:  # wandb's service may still append to its own debug logs
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "wandb" not in p.parts}

    before = snapshot()
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    proc = run_cli("run", str(spec), "--set", "model.width=128", "--set", "optim.kind=galore_adamw")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.width: 64 -> 128" in proc.stderr and "optim.kind: 'adamw' -> 'galore_adamw'" in proc.stderr
    assert snapshot() == before
