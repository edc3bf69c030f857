"""Bad input fails fast with a message naming the file or field: binary spec files, specs that
cannot fit a worker's memory, new fields' bad values. In-process CLI (`main`), no subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardyard.cli.main import main
from shardyard.models import build_model
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.parallel.parallelize import apply_activation_checkpointing
from shardyard.runtime.worker_memory import predict_worker_memory
from tests.helpers import ROOT, tiny_spec_yaml


def small_data(corpus: Path) -> list[str]:
    return ["--set", f"data.paths=[{corpus}]"]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.err


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"name: x\n\x00\x01\x02", "not a YAML text file (binary content: a NUL byte at offset 8)"),
        (b"name: caf\xe9\n", "not a YAML text file (not UTF-8: byte 0xe9 at offset 9)"),
        (b"\x7fELF\x02\x01\x01\x00\x00", "not a YAML text file (binary content: a NUL byte at offset 7)"),
    ],
)
def test_a_spec_file_that_is_not_text_is_named(tmp_path: Path, capsys, content: bytes, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    for command in ("validate", "run", "submit"):
        code, err = cli(capsys, command, str(path))
        assert code == 2 and f"error: {path}: {expected}" in err


def test_a_directory_given_as_spec_is_named(tmp_path: Path, capsys) -> None:
    code, err = cli(capsys, "validate", str(tmp_path))
    assert code == 2 and f"{tmp_path}: cannot read job spec" in err


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["resources.memory_per_worker=64MiB"], "a worker process itself (Python, torch, Ray) needs about 0.5 GiB"),
        (
            ["model.width=2048", "model.heads=16", "resources.memory_per_worker=2GiB"],
            "driven by model.width (2048) and model.depth (4) (preset tiny); shard them over the workers with "
            "parallel.shard: full",
        ),
        (
            ["training.batch_size=512", "data.seq_len=2048", "resources.memory_per_worker=8GiB"],
            "driven by training.batch_size (512) x data.seq_len (2048)",
        ),
        (
            ["model.moe.num_experts=2048", "resources.memory_per_worker=2GiB"],
            "mostly expert weights, driven by model.moe.num_experts (2048)",
        ),
    ],
)
def test_validate_run_and_submit_refuse_a_spec_that_cannot_fit(
    capsys, small_corpus: Path, overrides: list[str], field: str
) -> None:
    sets = [a for o in overrides for a in ("--set", o)] + small_data(small_corpus)
    for command in ("validate", "run", "submit") if "64MiB" in overrides[0] else ("validate",):
        code, err = cli(capsys, command, str(ROOT / "jobs" / "moe-tiny.yaml"), *sets)
        assert code == 2, err
        assert "predicted memory per worker" in err and "exceeds resources.memory_per_worker" in err and field in err


def test_a_spec_no_machine_could_hold_is_refused_against_this_machine(capsys, small_corpus: Path) -> None:
    code, err = cli(
        capsys,
        "validate",
        str(ROOT / "jobs" / "moe-tiny.yaml"),
        "--set",
        "model.width=65536",
        "--set",
        "model.heads=64",
        *small_data(small_corpus),
    )
    assert code == 2 and "exceeds this machine's RAM" in err and "model.width (65536)" in err


def test_sharding_lowers_the_prediction() -> None:
    # 8 blocks: FSDP2's gather and reduce buffers are a few blocks' worth whatever the depth, so with
    # two blocks `full` holds more than `zero2` (measured on 4 gloo ranks: 72.1 against 68.4 MB)
    def total(*overrides: str) -> int:
        spec = load_spec_text(
            tiny_spec_yaml("m", Path("/tmp/unused")), overrides=["resources.workers=4", "model.depth=8", *overrides]
        )
        with torch.device("meta"):
            model = build_model(spec.model, spec.data.seq_len)
        p = predict_worker_memory(spec, model)
        return p.total  # zero2 holds sharded state at rest but every block's parameters during a step

    plain = total()
    assert total("parallel.shard=zero2") < plain and total("parallel.shard=full") < total("parallel.shard=zero2")
    assert total("parallel.expert_parallel=4") < plain


def _saved_bytes(spec) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (the measurement)."""
    torch.manual_seed(0)
    model = build_model(spec.model, spec.data.seq_len)
    apply_activation_checkpointing(model, spec.training)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, 256, (spec.training.batch_size, spec.data.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(storages.values())


@pytest.mark.parametrize(
    "model",
    [
        "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2}}",
        "{kind: dense, width: 128, depth: 2, heads: 4, ffn: {hidden: 384, kind: gelu}}",
        "{kind: megabyte, stages: [{width: 64, depth: 2, heads: 2, patch_size: 8}, {width: 32, depth: 2, heads: "
        "2, patch_size: 8}]}",
    ],
)
def test_the_activation_estimate_matches_what_autograd_saves(model: str) -> None:
    spec = load_spec_text(
        tiny_spec_yaml("a", Path("/tmp/unused"), model=model), overrides=["training.batch_size=4", "data.seq_len=64"]
    )

    def step_peak(spec) -> int:  # what a step adds beyond the state held before it: activations + gradients
        p = predict_worker_memory(spec)
        return p.activations + p.grads

    estimate, measured = step_peak(spec), _saved_bytes(spec)
    assert 0.8 < estimate / measured < 1.25, (estimate, measured)
    if spec.model.stages is None:  # checkpointing keeps less; the estimate stays an upper bound
        checkpointed = spec.model_copy(
            update={"training": spec.training.model_copy(update={"activation_checkpointing": "full"})}
        )
        assert _saved_bytes(checkpointed) <= step_peak(checkpointed) < estimate


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.keep=1", "checkpoint.keep: Input should be greater than or equal to 2"),
        ("resources.memory_per_worker='8 parsecs'", "resources.memory_per_worker: '8 parsecs' is not a size"),
        ("env={'bad-name': x}", "env: 'bad-name' is not an environment variable name"),
        ("env={RAY_ADDRESS: x}", "env: RAY_ADDRESS is set by shardyard or Ray"),
        ("env={TOKEN: {secret: true}}", "env.TOKEN.EnvVarSpec.from_env: required field is missing"),
    ],
)
def test_new_fields_name_themselves_when_wrong(capsys, override: str, message: str) -> None:
    code, err = cli(capsys, "validate", str(ROOT / "jobs" / "moe-tiny.yaml"), "--set", override)
    assert code == 2 and message in err, err
