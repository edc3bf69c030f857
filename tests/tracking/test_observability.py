"""Step anatomy, MFU, memory and expert-load records of a real (one-process) training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shardyard.models.flops import training_flops_per_token
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.worker import LocalReporter, Trainer
from shardyard.tracking.anatomy import STEP_PARTS
from shardyard.tracking.expert_load import read_expert_load, utilisation_summary
from shardyard.tracking.logger import read_metrics
from tests.helpers import tiny_spec_yaml

WIDE_MOE = "{kind: moe, width: 32, depth: 4, heads: 2, ffn: {hidden: 32}, moe: {num_experts: 64, top_k: 2}}"


def _spec(
    tmp_path: Path,
    name: str,
    training: str,
    model: str | None = None,
    tracking: str = "{mode: disabled}",
    parallel: str | None = None,
):
    sections = {
        "resources": "{workers: 1, cpus_per_worker: 1, max_failures: 0}",
        "training": training,
        "tracking": tracking,
        "data": "{paths: [stdlib], seq_len: 32, max_bytes: 400000}",
    }
    if parallel:
        sections["parallel"] = parallel
    if model:
        sections["model"] = model
    return load_spec_text(tiny_spec_yaml(name, tmp_path, **sections))


def _fit(spec, run_dir: Path) -> Trainer:
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, spec.checkpoint.keep))
    trainer.fit()
    return trainer


def test_step_parts_add_up_to_the_step_time_and_mfu_is_a_fraction(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "anatomy",
        "{steps: 6, batch_size: 4, eval_every: 0, eval_bytes: 512, log_every: 3}",
        parallel="{dispatch: {dedup: true}}",
    )  # the dispatch stack on one worker: a timed all-to-all
    _fit(spec, tmp_path / "anatomy")
    train = [r for r in read_metrics(tmp_path / "anatomy") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    info = json.loads((tmp_path / "anatomy" / "run_info.json").read_text())
    flops_per_token, peak = info["flops_per_token"], info["peak_flops_per_worker"]
    assert flops_per_token == training_flops_per_token(spec.model, spec.data.seq_len) and peak > 0
    tokens_per_step = 1 * 4 * 32  # workers x batch_size x seq_len (grad_accum 1)
    for record in train:
        parts = sum(record[f"time/{p}_ms"] for p in STEP_PARTS)
        assert record["time/step_ms"] > 0
        assert abs(parts - record["time/step_ms"]) <= 0.10 * record["time/step_ms"], record
        # MFU = achieved FLOP/s over the peak: from the logged throughput exactly, and bounded by the
        # FLOP/s of the timed steps alone (the window's wall time also holds logging between steps).
        assert record["mfu"] == pytest.approx(flops_per_token * record["tokens_per_s"] / peak, rel=1e-9)
        step_flops_per_s = flops_per_token * tokens_per_step / (record["time/step_ms"] / 1e3)
        assert 0.5 * step_flops_per_s / peak < record["mfu"] <= 1.05 * step_flops_per_s / peak, record
        assert 0.0 < record["time/a2a_ms"] < record["time/forward_ms"] + record["time/backward_ms"]
        assert record["mem/peak_rss_gib_max"] > 0.05 and record["mem/predicted_state_gib"] > 0


def test_timers_do_not_change_the_results(tmp_path: Path) -> None:
    losses = {}
    for on in (True, False):
        name = f"timed{int(on)}"
        spec = _spec(
            tmp_path,
            name,
            "{steps: 4, batch_size: 4, eval_every: 0, eval_bytes: 512, log_every: 1}",
            tracking=f"{{mode: disabled, step_anatomy: {str(on).lower()}}}",
        )
        _fit(spec, tmp_path / name)
        records = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
        losses[on] = [r["loss"] for r in records]
        assert any(k.startswith("time/forward") for k in records[0]) == on
    assert losses[True] == losses[False]


def test_64_experts_log_few_keys_and_the_side_file_holds_the_routers_exact_counts(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, "wide", "{steps: 2, batch_size: 4, eval_every: 0, eval_bytes: 512, log_every: 1}", model=WIDE_MOE
    )
    # An independent count: the same initial weights (seed) routing the first batch, read from the routers.
    torch.manual_seed(spec.seed)
    from shardyard.data.corpus import load_corpus
    from shardyard.data.loader import build_train_loader
    from shardyard.models import build_model, moe_layers

    reference = build_model(spec.model, spec.data.seq_len)
    counted: list[torch.Tensor] = []
    for layer in moe_layers(reference):
        layer.router.register_forward_hook(
            lambda _m, _i, routing: counted.append(torch.bincount(routing.expert_ids, minlength=64))
        )
    loader = build_train_loader(
        load_corpus(spec.data).train, spec.data.seq_len, spec.training.batch_size, 0, 1, spec.seed
    )
    inputs, targets = loader.next_batch()
    reference(inputs, targets)

    _fit(spec, tmp_path / "wide")
    train = [r for r in read_metrics(tmp_path / "wide") if r["kind"] == "train"]
    scalar_keys = {k for k, v in train[0].items() if isinstance(v, (int, float))}
    assert len(scalar_keys) < 100, sorted(scalar_keys)
    assert not any("expert" in k and "share" in k for k in scalar_keys)
    steps, per_layer = read_expert_load(tmp_path / "wide")
    assert steps.tolist() == [1, 2] and len(per_layer) == 4
    for layer, (counts, expected) in enumerate(zip(per_layer, counted)):
        np.testing.assert_array_equal(counts[0], expected.double().numpy())
        summary = utilisation_summary(counts[0], top_k=2)
        assert train[0][f"moe/layer{layer}/dead"] == summary["dead"] == float((expected == 0).sum())
        assert train[0][f"moe/layer{layer}/util_max"] == summary["util_max"]
        assert 0.0 < train[0][f"moe/layer{layer}/router_entropy"] <= np.log(64) + 1e-6


def test_flops_per_token_of_a_dense_model_is_six_times_its_multiply_adds(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "flops",
        "{steps: 2, batch_size: 2}",
        model="{kind: dense, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}}",
    )
    flops = training_flops_per_token(spec.model, spec.data.seq_len)
    width, depth, hidden, vocab, seq = 64, 2, 128, 256, spec.data.seq_len
    matmul_weights = depth * (4 * width * width + 3 * width * hidden) + vocab * width  # attention, swiglu, head
    attention = depth * 2 * seq * width  # multiply-adds of QK^T and AV per position (full, not causal-halved)
    assert abs(flops - 3 * 2 * (matmul_weights + attention)) / flops < 0.02


def test_a_model_the_meta_device_cannot_run_falls_back_to_six_times_its_active_parameters(tmp_path: Path) -> None:
    """The self-guided low-rank FFN reads its blend on the host: no meta forward, so 6 x active parameters
    (counted here by hand from the architecture: no MoE, so every parameter is active)."""
    spec = _spec(
        tmp_path,
        "guided",
        "{steps: 2, batch_size: 2}",
        model="{kind: dense, width: 64, depth: 2, heads: 2, ffn: {kind: lowrank, hidden: 128, rank: 16, self_guided: "
        "0.5}}",
    )
    width, depth, hidden, rank, vocab = 64, 2, 128, 16, 256
    attention = 3 * width * width + width * width  # fused qkv, output projection (no biases)
    # SwiGLU gate+up (2 * hidden outputs) and down, each a rank-r factor pair u @ v plus the full-rank
    # guide matrix the self-guided blend mixes in early in training
    gate_up = 2 * hidden * rank + rank * width + 2 * hidden * width
    down = width * rank + rank * hidden + width * hidden
    block = 2 * width + attention + gate_up + down  # two RMSNorm weights
    active = 2 * vocab * width + depth * block + width  # embedding, untied head, final norm
    assert active == 131_392
    assert training_flops_per_token(spec.model, spec.data.seq_len) == 6.0 * active


def test_throughput_counts_the_logging_but_not_evaluation_or_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """A window's bytes/s is over all of its wall time but evaluation and checkpoints: the logging of
    the window before (observe, the metrics write), the stop agreement and the save polls count. Slowed
    here on purpose: logging by 0.2 s, evaluation and checkpoints by 2 s each, all every 2 steps."""
    import time

    for name, delay in (("observe", 0.2), ("evaluate", 2.0), ("save_and_report", 2.0)):
        slow = getattr(Trainer, name)
        monkeypatch.setattr(
            Trainer, name, lambda self, *a, _slow=slow, _delay=delay, **k: (time.sleep(_delay), _slow(self, *a, **k))[1]
        )
    spec = _spec(tmp_path, "rate", "{steps: 6, batch_size: 4, eval_every: 2, eval_bytes: 512, log_every: 2}")
    spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"every": 2})})
    _fit(spec, tmp_path / "rate")
    train = [r for r in read_metrics(tmp_path / "rate") if r["kind"] == "train"]
    window_s = [2 * 4 * 32 / r["tokens_per_s"] for r in train]  # 2 steps of 4 x 32 bytes
    assert [r["step"] for r in train] == [2, 4, 6]
    for seconds in window_s[1:]:  # each holds the logging of the window before, not its eval or checkpoint
        assert 0.2 <= seconds < 2.0, window_s
