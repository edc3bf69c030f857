"""`shardyard export` consolidates sharded checkpoints (expert-parallel, DeepSpeed ZeRO-3) into the
single-worker model; `generate` reads every kind of checkpoint; `export --format hf` streams a ZeRO-2
and a ZeRO-3 checkpoint to exactly DeepSpeed's own consolidation."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shardyard.platform.schema import JobSpec
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import run_cli
from tests.runtime.test_parallel_plans import job, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DENSE_JSON = '{"kind": "dense", "width": 64, "depth": 2, "heads": 2, "ffn": {"hidden": 128}}'


def single_worker_weights(spec, run_dir: Path) -> dict[str, torch.Tensor]:
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, 1))
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def exported(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    proc = run_cli("export", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "spec.yaml").exists()
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_export_of_an_expert_parallel_checkpoint_is_the_single_worker_model(tmp_path: Path) -> None:
    run(job(tmp_path, "ep", 2, 2, "none", 6, 6), tmp_path / "ep")
    reference = single_worker_weights(job(tmp_path, "one", 1, 1, "none", 6, 6), tmp_path / "one")
    assert_same_weights(exported(tmp_path / "ep", tmp_path / "export-ep"), reference)
    for source in (tmp_path / "ep", tmp_path / "export-ep"):  # a run directory and an export
        sample = run_cli("generate", str(source), "--prompt", "def ", "--bytes", "16")
        assert sample.returncode == 0 and "16 bytes" in sample.stderr, sample.stderr
    assert_evaluates(tmp_path / "ep", tmp_path, job(tmp_path, "one", 1, 1, "none", 6, 6), reference)


def reference_bits_per_byte(spec, weights: dict[str, torch.Tensor], text: bytes) -> float:
    """Bits per byte of the single-worker reference model over every window of `text` (seq_len + 1
    bytes each, stride seq_len: the whole text when its length is a multiple of seq_len plus one),
    computed here from the logits: the figure `eval` must print for this text."""
    from shardyard.models import build_model

    seq = spec.data.seq_len
    model = build_model(spec.model, seq, 256)
    model.load_state_dict(weights)
    model.eval()
    data = torch.tensor(list(text), dtype=torch.long)
    windows = (len(data) - 1) // seq
    x = torch.stack([data[i * seq : i * seq + seq + 1] for i in range(windows)])
    with torch.no_grad():
        logits, _ = model(x[:, :-1], x[:, 1:])
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
    return float(nats) / math.log(2) / (windows * seq)


def assert_evaluates(run_dir: Path, tmp_path: Path, spec, reference: dict[str, torch.Tensor]) -> None:
    """`shardyard eval` scores the checkpoint's model on any text: the figure it prints is the reference
    model's own bits per byte on that text."""
    seq = spec.data.seq_len
    windows = 4  # a multiple of the run's 2 workers; 4 * seq + 1 bytes leave no slack, so they tile the text
    line = b"def main(argv):\n    return sum(int(a) for a in argv)\n"
    data = (line * (windows * seq // len(line) + 2))[: windows * seq + 1]
    text = tmp_path / "held-out.txt"
    text.write_bytes(data)
    proc = run_cli("eval", str(run_dir), "--data", str(text))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # (DeepSpeed prints lines of its own to stdout first)
    found = re.search(r"^([0-9.]+) \+- [0-9.na]+ bits/byte \((\d+) windows, ([\d,]+) bytes\)", proc.stdout, re.M)
    assert found, proc.stdout
    assert (int(found.group(2)), found.group(3)) == (windows, f"{windows * seq:,}"), proc.stdout
    expected = reference_bits_per_byte(spec, reference, data)
    assert float(found.group(1)) == pytest.approx(expected, abs=2e-3), (proc.stdout, expected)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[JobSpec, Path]]:
    """(spec, run directory) of a tiny dense run under ZeRO `stage` on 2 gloo ranks, trained once per
    module and shared by the tests that read it."""
    pytest.importorskip("deepspeed")
    runs: dict[int, tuple[JobSpec, Path]] = {}

    def get(stage: int) -> tuple[JobSpec, Path]:
        if stage not in runs:
            storage = tmp_path_factory.mktemp(f"zero{stage}")
            spec = job(storage, f"zero{stage}", 2, 1, "none", 6, 6)
            spec = spec.model_copy(update={"parallel": spec.parallel.model_copy(update={"zero": stage})})
            spec.model = spec.model.model_validate_json(DENSE_JSON)
            run(spec, storage / "run")
            runs[stage] = spec, storage / "run"
        return runs[stage]

    return get


def test_export_of_a_zero3_checkpoint_is_the_single_worker_model(tmp_path: Path, zero_run) -> None:
    zero3, run_dir = zero_run(3)
    one = job(tmp_path, "one", 1, 1, "none", 6, 6)
    one.model = zero3.model
    reference = single_worker_weights(one, tmp_path / "one")
    assert_same_weights(exported(run_dir, tmp_path / "export-zero3"), reference)
    sample = run_cli("generate", str(run_dir), "--prompt", "def ", "--bytes", "16")
    assert sample.returncode == 0 and "16 bytes" in sample.stderr, sample.stderr
    assert_evaluates(run_dir, tmp_path, one, reference)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_hf_export_from_a_zero_checkpoint_streams_deepspeeds_consolidated_weights(
    tmp_path: Path, zero_run, stage: int
) -> None:
    """Export reads a ZeRO checkpoint one tensor at a time from the ranks' flat partitions; every tensor
    it writes equals, bit for bit, what DeepSpeed's own zero_to_fp32 consolidation gives."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from shardyard.interop import pick_family
    from shardyard.interop.hf_dir import write_hf
    from shardyard.runtime.checkpoint import find_latest_checkpoint
    from shardyard.runtime.export import export_hf
    from shardyard.runtime.parallel.deepspeed_zero import ENGINE_TAG

    spec, run_dir = zero_run(stage)
    name, files = export_hf(run_dir, tmp_path / "hf")
    assert name == "llama" and len(files) == 1
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(find_latest_checkpoint(run_dir)), tag=ENGINE_TAG)
    reference = write_hf(
        tmp_path / "reference",
        pick_family(spec.model, "llama"),
        spec.model,
        {k: tuple(v.shape) for k, v in consolidated.items()},
        lambda key: consolidated[key],
        vocab_size=256,
        seq_len=spec.data.seq_len,
    )
    got, want = load_file(str(files[0])), load_file(str(reference[0]))
    assert sorted(got) == sorted(want) and "model.layers.1.mlp.down_proj.weight" in want
    for key, value in want.items():
        assert torch.equal(got[key], value), key
