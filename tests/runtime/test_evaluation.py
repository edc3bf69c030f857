"""Held-out bits per byte and its standard error: against a direct computation, across gloo ranks,
and `shardyard eval` against the figure the training loop logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardyard.comm.launch import spawn
from shardyard.comm.topology import Topology
from shardyard.data.ngram_control import NGramControl
from shardyard.data.validation import HeldOutText, all_batches, all_controls, rank_batches, rank_controls
from shardyard.models import build_model
from shardyard.platform.schema import ModelSpec
from shardyard.platform.spec import load_spec
from shardyard.runtime.evaluation import evaluate, summarize
from tests.helpers import run_cli, tiny_spec_yaml, train_on_gloo

SEQ = 32


def _model(kind: str = "dense") -> torch.nn.Module:
    torch.manual_seed(0)
    moe = {"num_experts": 4, "top_k": 2} if kind == "moe" else None
    return build_model(ModelSpec(kind=kind, width=32, depth=2, heads=2, ffn={"hidden": 64}, moe=moe), SEQ)


def _text(length: int = 20_000) -> HeldOutText:
    data = np.frombuffer((b"def f(x):\n    return x * 2  # doubled\n" * 1000)[:length], dtype=np.uint8).copy()
    data[::7] = np.random.default_rng(0).integers(0, 256, len(data[::7]), dtype=np.uint8)  # some noise
    return HeldOutText(data, np.zeros(1, np.int64))


def _direct(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
    """Per-window bits per byte from log-softmax by hand; mean and numpy's standard error."""
    arr = np.array(_per_window(model, batches))
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))), len(arr)


def test_standard_error_matches_a_direct_computation() -> None:
    model = _model()
    batches = all_batches(_text(), SEQ, eval_bytes=6400, batch_size=16, world=1)
    result = evaluate(model, batches, torch.device("cpu"))
    mean, stderr, n = _direct(model, batches)
    assert result.windows == n == 200 and result.bytes == n * SEQ
    assert result.bpb == pytest.approx(mean, rel=1e-6)
    assert result.stderr == pytest.approx(stderr, rel=1e-4)
    model.train()  # evaluation puts the model in eval mode and back
    evaluate(model, batches, torch.device("cpu"))
    assert model.training


def _source_text() -> tuple[HeldOutText, np.ndarray]:
    """(held-out text, training bytes): Python sources, so windows differ in difficulty as real ones do."""
    import email
    import json as json_module

    sources = [Path(json_module.__file__).parent / name for name in ("decoder.py", "encoder.py", "scanner.py")]
    train = np.frombuffer(
        b"".join(Path(email.__file__).parent.joinpath(n).read_bytes() for n in ("message.py", "utils.py", "header.py")),
        dtype=np.uint8,
    )
    held_out = np.frombuffer(b"".join(f.read_bytes() for f in sources), dtype=np.uint8)
    return HeldOutText(held_out.copy(), np.zeros(1, np.int64)), train.copy()


def test_regression_estimate_matches_numpy_least_squares() -> None:
    """With n-gram control variates the figure is mean(y) + b . (X - mean(x)), b and the residual standard
    error as numpy's least squares gives them from the same windows; it is tighter than the plain mean's."""
    model = _model()
    text, train = _source_text()
    control = NGramControl.fit(train)
    batches = all_batches(text, SEQ, eval_bytes=12_800, batch_size=16, world=1)
    controls = all_controls(text, SEQ, 12_800, 1, control)
    result = evaluate(model, batches, torch.device("cpu"), controls=controls)
    plain = evaluate(model, batches, torch.device("cpu"))
    values = np.array(_per_window(model, batches))
    x = controls.values
    design = np.column_stack([np.ones(len(values)), x - x.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    residuals = values - design @ coef
    expected = values.mean() + coef[1:] @ (controls.means - x.mean(axis=0))
    expected_se = math.sqrt(residuals @ residuals / (len(values) - x.shape[1] - 1) / len(values))
    assert result.windows == len(values) == 400
    assert result.bpb == pytest.approx(expected, rel=1e-6)
    assert result.stderr == pytest.approx(expected_se, rel=1e-4)
    assert result.stderr < plain.stderr and result.control_gain == pytest.approx((plain.stderr / result.stderr) ** 2)
    # too few windows for a slope (16 < CONTROL_MIN_WINDOWS): the plain mean
    few = evaluate(model, batches[:1], torch.device("cpu"), controls=controls)
    assert few == evaluate(model, batches[:1], torch.device("cpu")) and few.control_gain == 1.0
    # controls are for bytes: with a tokenizer's byte counts the plain ratio estimator is used
    ratio = evaluate(
        model, batches, torch.device("cpu"), token_bytes=torch.ones(256, dtype=torch.int32), controls=controls
    )
    assert ratio.bpb == pytest.approx(plain.bpb, rel=1e-9) and ratio.control_gain == 1.0


def _per_window(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Every window's bits per byte from log-softmax by hand, in batch order."""
    values = []
    with torch.no_grad():
        model.eval()
        for inputs, targets in batches:
            logits, _ = model(inputs)
            logp = F.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            values.extend((-logp.mean(dim=1) / math.log(2)).tolist())
    return values


def test_summarize_edge_cases() -> None:
    one = summarize(1, 3.0, 9.0, 32)
    assert one.bpb == 3.0 and math.isnan(one.stderr) and one.windows == 1
    same = summarize(4, 8.0, 16.0, 32)  # four windows of 2.0: no spread
    assert same.bpb == 2.0 and same.stderr == 0.0


def _rank_eval(topology: Topology, kind: str, out: str) -> None:
    model = _model(kind)
    text, train = _source_text()
    batches = rank_batches(text, SEQ, 6400, 16, topology.rank, topology.world_size)
    controls = rank_controls(text, SEQ, 6400, topology.rank, topology.world_size, NGramControl.fit(train))
    result = evaluate(model, batches, torch.device("cpu"), world=topology.world_size, controls=controls)
    Path(out, f"rank{topology.rank}.json").write_text(
        json.dumps({**result.__dict__, "mine": sum(len(b[0]) for b in batches)})
    )


@pytest.mark.distributed
@pytest.mark.parametrize("world,kind", [(2, "moe"), (4, "dense")])
def test_ranks_agree_with_one_process_over_the_same_windows(tmp_path: Path, world: int, kind: str) -> None:
    spawn(_rank_eval, world, world, kind, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert len({r["mine"] for r in results}) == 1  # equal window counts on every rank
    text, train = _source_text()
    single = evaluate(
        _model(kind),
        all_batches(text, SEQ, 6400, 16, world),
        torch.device("cpu"),
        controls=all_controls(text, SEQ, 6400, world, NGramControl.fit(train)),
    )
    assert single.control_gain > 1
    for r in results:  # every rank reports the all-reduced figure of the whole window set
        assert r["windows"] == single.windows == results[0]["mine"] * world
        assert r["bpb"] == pytest.approx(single.bpb, rel=1e-6)
        assert r["stderr"] == pytest.approx(single.stderr, rel=1e-4)


@pytest.mark.slow
def test_eval_command_matches_in_training_evaluation(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_bytes(b"The quick brown fox jumps over the lazy dog. " * 400)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        tiny_spec_yaml(
            "evalcmd",
            tmp_path / "runs",
            training=f"{{steps: 12, batch_size: 4, eval_every: 12, eval_bytes: 8192, log_every: 4, "
            f"eval_sets: {{own: [{own / 'notes.txt'}]}}}}",
            checkpoint=f"{{dir: {tmp_path / 'runs'}, every: 12, keep: 2}}",
        )
    )
    run_dir = tmp_path / "runs" / "evalcmd"
    train_on_gloo(load_spec(spec), run_dir, 2)  # in-training evaluation splits its windows over 2 ranks
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in evals if r.get("kind") == "eval"][-1]
    assert logged["val_windows"] == 8192 // 64 and logged["val_bpb_stderr"] > 0
    held_out = run_cli("eval", str(run_dir), "--step", "12")
    assert held_out.returncode == 0, held_out.stderr
    printed = float(held_out.stdout.split()[0])
    assert printed == pytest.approx(logged["val_bpb"], abs=2e-4)  # printed with 4 decimals
    assert float(held_out.stdout.split()[2]) == pytest.approx(logged["val_bpb_stderr"], abs=2e-4)
    own_text = run_cli("eval", str(run_dir), "--data", str(own / "notes.txt"))
    assert own_text.returncode == 0, own_text.stderr
    assert float(own_text.stdout.split()[0]) == pytest.approx(logged["val/own_bpb"], abs=2e-4)
    missing = run_cli("eval", str(run_dir), "--step", "5")
    assert missing.returncode != 0 and "step 5" in missing.stderr


def test_evaluation_leaves_the_training_steps_moe_accounting_alone() -> None:
    model = _model("moe")
    model.train()
    inputs = torch.randint(0, 256, (4, SEQ))
    model(inputs, inputs)  # a training forward: counts go into the layers' step buffers
    layers = [m for m in model.modules() if hasattr(m, "take_step_stats")]
    assert layers
    before = [{k: v.clone() for k, v in layer.take_step_stats().items()} for layer in layers]
    for layer, stats in zip(layers, before):  # put them back: take_step_stats resets
        for name, value in stats.items():
            getattr(layer, name).copy_(value)
    evaluate(model, all_batches(_text(), SEQ, 3200, 16, 1), torch.device("cpu"))
    assert model.training
    for layer, stats in zip(layers, before):
        after = layer.take_step_stats()
        assert stats.keys() == after.keys() and all(torch.equal(stats[k], after[k]) for k in stats)
    assert float(before[0]["tokens_per_expert"].sum()) == 4 * SEQ * 2  # the training forward did count
