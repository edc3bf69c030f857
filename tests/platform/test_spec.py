"""Job spec loading: good specs, and bad ones whose messages name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.platform.errors import SpecError
from shardyard.platform.spec import load_spec, load_spec_text, spec_from_json, spec_to_yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = """name: t
model:
  kind: moe
  width: 64
  heads: 4
  moe:
    num_experts: 4
    top_k: 2
training:
  steps: 30
  eval_every: 5
"""


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name


def test_defaults_preset_and_overrides() -> None:
    spec = load_spec_text(
        "name: t\nmodel: {kind: moe, preset: small, depth: 3}\n",
        "t.yaml",
        ["training.steps=50", "model.moe.num_experts=4", "tracking.tags=[a, b]"],
    )
    assert (spec.model.width, spec.model.depth, spec.model.ffn.hidden) == (256, 3, 768)  # preset < file
    assert spec.training.steps == 50 and spec.model.moe.num_experts == 4
    assert spec.tracking.tags == ["a", "b"]
    assert spec.model.moe.capacity_factor is None  # dropless by default
    assert spec.tracking.mode == "offline"


def test_round_trip_through_yaml_and_json() -> None:
    spec = load_spec_text(BASE)
    assert load_spec_text(spec_to_yaml(spec)) == spec
    assert spec_from_json(spec.model_dump_json()) == spec


BAD = [
    # (yaml, overrides, expected line, expected fragments)
    ("name: t\nmodel:\n  widht: 64\n", [], 3, ["model.widht", "unknown field"]),
    ("name: t\nbogus: 1\n", [], 2, ["bogus", "unknown field"]),
    ("model: {kind: moe}\n", [], 1, ["name", "required"]),
    ("name: t\ntraining:\n  steps: -5\n", [], 3, ["training.steps", "greater than 0"]),
    ("name: t\ntraining:\n  steps: many\n", [], 3, ["training.steps", "valid integer"]),
    (
        "name: t\nmodel:\n  kind: moe\n  moe:\n    num_experts: 2\n    top_k: 3\n",
        [],
        4,
        ["model.moe", "top_k (3) must not exceed num_experts (2)"],
    ),
    ("name: t\nmodel:\n  width: 100\n  heads: 3\n", [], 2, ["model", "heads (3) must divide width (100)"]),
    ("name: t\nmodel:\n  kind: transformerxl\n", [], 3, ["model.kind", "Input should be"]),
    ("name: t\nmodel:\n  kind: moe\n  moe: {router: switch, top_k: 2}\n", [], 4, ["switch", "top-1"]),
    ("name: t\nmodel:\n  kind: dense\n  moe: {num_experts: 4}\n", [], 2, ["model", "kind is 'dense'"]),
    ("name: t\noptim:\n  lr: 0\n", [], 3, ["optim.lr", "greater than 0"]),
    ("name: t\noptim:\n  betas: [0.9, 1.5]\n", [], 2, ["optim", "betas"]),
    ("name: t\noptim:\n  kind: sgd\n  momentum: 1.0\n", [], 2, ["optim", "momentum must lie in [0, 1)"]),
    ("name: t\noptim:\n  momentum: 0.9\n", [], 2, ["optim", "momentum only applies to kind sgd"]),
    ("name: t\noptim:\n  kind: sgd\n  galore: {rank: 8}\n", [], 2, ["optim", "kind is 'sgd'"]),
    ("name: t\ntraining:\n  precision: fp8\n", [], 3, ["training.precision", "fp32"]),
    ("name: t\ntracking:\n  mode: sometimes\n", [], 3, ["tracking.mode", "offline"]),
    ("name: t\nresources:\n  workers: 0\n", [], 3, ["resources.workers", "greater than 0"]),
    ("name: 'bad name!'\n", [], 1, ["name", "pattern"]),
    (
        "name: t\nmodel: {kind: moe}\nparallel: {expert_parallel: 3}\nresources: {workers: 2}\n",
        [],
        3,
        ["parallel.expert_parallel: 3 must divide resources.workers (2)"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 3}\nresources: {workers: 4}\n",
        [],
        2,
        ["parallel.tensor_parallel: 3 must divide resources.workers (4)"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 2}\nmodel: {heads: 4, kv_heads: 1}\n",
        [],
        2,
        ["parallel.tensor_parallel: 2 must divide model.heads (4) and model.kv_heads (1)"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 2, zero: 2}\nmodel: {kind: dense}\n",
        [],
        2,
        ["parallel.tensor_parallel: 2 and parallel.zero: 2", "use parallel.shard"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 2}\nmodel:\n  kind: megabyte\n  stages: [{width: 64, depth: 1, heads: 2, "
        "patch_size: 64}, {width: 32, depth: 1, heads: 2, patch_size: 8}]\n",
        [],
        2,
        ["not model.kind 'megabyte'"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 2}\noptim: {kind: galore_adamw, galore: {rank: 8}}\n",
        [],
        2,
        ["parallel.tensor_parallel: 2", "optim.kind galore_adamw projects whole gradient matrices"],
    ),
    (
        "name: t\nparallel: {tensor_parallel: 2}\ndata: {seq_len: 33}\n",
        [],
        2,
        ["parallel.tensor_parallel: 2 must divide data.seq_len (33)"],
    ),
    (
        "name: t\nparallel: {pipeline_parallel: 3}\nresources: {workers: 4}\n",
        [],
        2,
        ["parallel.pipeline_parallel: 3 must divide resources.workers (4)"],
    ),
    (
        "name: t\nparallel:\n  pipeline_parallel: 2\n  pipeline: {microbatches: 3}\ntraining: {batch_size: 8}\n",
        [],
        4,
        ["parallel.pipeline.microbatches: 3 must divide training.batch_size (8"],
    ),
    (
        "name: t\nparallel:\n  pipeline_parallel: 4\n  pipeline: {microbatches: 2}\nresources: {workers: 4}\n",
        [],
        4,
        ["parallel.pipeline.microbatches: 2 is fewer than the 4 stages", "gpipe"],
    ),
    (
        "name: t\nparallel: {pipeline_parallel: 2, zero: 1}\n",
        [],
        2,
        ["parallel.zero: DeepSpeed ZeRO (1) does not combine with parallel.pipeline_parallel (2)"],
    ),
    (
        "name: t\nmodel: {depth: 4, tie_embeddings: true}\nparallel: {pipeline_parallel: 2}\n",
        [],
        2,
        ["model.tie_embeddings", "untie"],
    ),
    (
        "name: t\nmodel: {depth: 4}\nparallel: {pipeline_parallel: 2, pipeline: {layers_per_stage: [1, 2]}}\n",
        [],
        3,
        ["parallel.pipeline.layers_per_stage: [1, 2]", "summing to model.depth (4)"],
    ),
    (
        "name: t\nmodel: {depth: 3}\nparallel: {pipeline_parallel: 2, pipeline: {schedule: interleaved_1f1b}}\n",
        [],
        3,
        ["4 stages, but model.depth is 3"],
    ),
    (
        "name: t\nmodel: {kind: moe}\nparallel: {pipeline_parallel: 2, expert_parallel: 2}\nresources: {workers: 2}\n",
        [],
        3,
        ["parallel.expert_parallel: 2 must divide the workers of a pipeline stage (1 ="],
    ),
    ("name: t\ndata:\n  val_fraction: 0.9\n", [], 3, ["data.val_fraction", "less than 0.5"]),
    ("name: t\ndata:\n  paths: []\n", [], 3, ["data.paths", "at least 1"]),
    ("name: t\nmodel:\n  ffn: {kind: lowrank}\n", [], 3, ["model.ffn", "needs ffn.rank"]),
    (
        "name: t\nmodel: {kind: moe, moe: {capacity_factor: -1}}\n",
        [],
        2,
        ["model.moe.capacity_factor", "greater than 0"],
    ),
]


@pytest.mark.parametrize("text,overrides,line,fragments", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_specs_name_file_line_and_field(text: str, overrides: list[str], line: int, fragments: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "job.yaml", overrides)
    message = str(info.value)
    assert f"job.yaml:{line}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_moot_settings_run_and_are_explained() -> None:
    """`--set training.steps=20` on a spec that evaluates every 40 steps runs, evaluating at the end."""
    spec = load_spec_text(
        "name: t\noptim:\n  schedule: {warmup: 30}\ntraining: {steps: 100, eval_every: 40}\n",
        "job.yaml",
        ["training.steps=20"],
    )
    notes = "\n".join(spec.notes())
    assert spec.training.steps == 20
    assert "training.eval_every: 40 exceeds training.steps (20): evaluating once, at the end (step 20)" in notes
    assert "optim.schedule.warmup: 30" in notes


def test_bad_override_names_the_set_flag() -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(BASE, "job.yaml", ["training.steps=abc"])
    assert "--set training.steps=abc" in str(info.value) and "training.steps" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec_text(BASE, "job.yaml", ["model.moe.top_k=9"])
    assert "job.yaml:6" in str(info.value) and "--set model.moe.top_k=9" in str(info.value)
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec_text(BASE, "job.yaml", ["training.steps"])
    with pytest.raises(SpecError, match="is a value, not a section"):
        load_spec_text(BASE, "job.yaml", ["name.x=1"])


def test_yaml_syntax_errors_and_duplicates_have_lines() -> None:
    with pytest.raises(SpecError, match=r"job.yaml:3: not valid YAML"):
        load_spec_text("name: t\nmodel:\n  width: 1: 2\n", "job.yaml")
    with pytest.raises(SpecError, match=r"job.yaml:3: .*duplicate key 'steps' \(first on line 2\)"):
        load_spec_text("training:\n  steps: 1\n  steps: 2\n", "job.yaml")
    with pytest.raises(SpecError, match="a job spec is a mapping"):
        load_spec_text("- 1\n- 2\n", "job.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such job spec file"):
        load_spec(tmp_path / "nope.yaml")
