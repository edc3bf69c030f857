"""The Trainer in one process (no Ray): resume, gradient accumulation, activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardyard.platform.spec import load_spec_text
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import assert_same_series, tiny_spec_yaml, train_grad_norms

MOE_NO_AUX = "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2, aux_loss: 0.0, z_loss: 0.0}}"
DENSE = "{kind: dense, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}}"


def one_worker_spec(
    tmp_path: Path,
    name: str = "t",
    training: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
):
    sections = {"resources": "{workers: 1, cpus_per_worker: 1, max_failures: 0}"}
    if training:
        sections["training"] = training
    if model:
        sections["model"] = model
    return load_spec_text(tiny_spec_yaml(name, tmp_path, **sections), overrides=overrides)


def train(spec, run_dir: Path, resume: Path | None = None) -> tuple[Trainer, LocalReporter]:
    reporter = LocalReporter(run_dir, spec.checkpoint.keep)
    trainer = Trainer(spec, run_dir, reporter)
    trainer.resume(resume)
    trainer.fit()
    return trainer, reporter


def losses(run_dir: Path) -> list[float]:
    from shardyard.tracking.logger import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"]


def test_resume_in_one_process_continues_exactly(tmp_path: Path) -> None:
    spec = one_worker_spec(tmp_path, training="{steps: 12, batch_size: 4, eval_every: 6, eval_bytes: 2048}")
    full, reporter = train(spec, tmp_path / "full")
    assert [m["step"] for m in reporter.metrics] == [8, 12]  # checkpoint.every 8, and the last step
    first = ckpt.find_latest_checkpoint(tmp_path / "full")
    assert first is not None and ckpt.verify_checkpoint(first) is None

    half = spec.model_copy(update={"training": spec.training.model_copy(update={"steps": 12})})
    part, _ = train(half, tmp_path / "part", resume=tmp_path / "full" / "checkpoint_00000008")
    assert part.step == 12
    for (name, a), b in zip(full.model.state_dict().items(), part.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # bit-identical on one process


@pytest.mark.parametrize("model", [DENSE, MOE_NO_AUX], ids=["dense", "moe"])
def test_grad_accum_4x2_equals_1x8(tmp_path: Path, model: str) -> None:
    """Four micro-batches of 2 give the optimizer step of one batch of 8 (same windows): the same losses,
    the same gradient norm before clipping at every step (clipping and Adam would hide a constant
    scale of the gradients in the weights), the same weights."""
    runs = {}
    for accum, batch in ((1, 8), (4, 2)):
        spec = one_worker_spec(
            tmp_path,
            f"acc{accum}",
            model=model,
            training=f"{{steps: 6, batch_size: {batch}, grad_accum: {accum}, eval_every: 0, eval_bytes: 2048}}",
        )
        trainer, _ = train(spec, tmp_path / f"acc{accum}")
        runs[accum] = (losses(tmp_path / f"acc{accum}"), trainer.model.state_dict())
    assert runs[4][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    norms = {accum: train_grad_norms(tmp_path / f"acc{accum}") for accum in (1, 4)}
    assert len(norms[1]) == 6
    assert max(norms[1].values()) > spec.optim.grad_clip > 0  # clipping acts, and the norm logged is before it
    assert_same_series(norms[4], norms[1], rel=1e-4, what="grad_norm")
    for name, value in runs[1][1].items():
        torch.testing.assert_close(runs[4][1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps for backward during one training-mode forward of the trainer's model on a
    fixed batch: every tensor saved for backward passes the pack hook, except those an activation
    checkpoint drops (it packs them with its own hook and recomputes them in backward)."""
    packed = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal packed
        packed += t.numel() * t.element_size()
        return t

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, trainer.spec.data.seq_len + 1), generator=gen)
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = trainer.model(x[:, :-1], x[:, 1:])
    loss.backward()  # the checkpointed blocks recompute here (outside the hook)
    trainer.model.zero_grad(set_to_none=True)
    return packed


def test_activation_checkpointing_changes_memory_not_results(tmp_path: Path) -> None:
    base = "{steps: 6, batch_size: 4, eval_every: 0, eval_bytes: 2048%s}"
    plain, _ = train(one_worker_spec(tmp_path, "plain", training=base % ""), tmp_path / "plain")
    saved = {"none": saved_activation_bytes(plain)}
    for mode in ("full", "every_n"):
        spec = one_worker_spec(tmp_path, mode, training=base % f", activation_checkpointing: {mode}")
        checkpointed, _ = train(spec, tmp_path / mode)
        assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
        for name, value in plain.model.state_dict().items():
            torch.testing.assert_close(checkpointed.model.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)
        saved[mode] = saved_activation_bytes(checkpointed)
    # depth 2: full recomputes both blocks, every_n (every 2nd) one of them; the embedding, final norm
    # and head keep theirs in every mode
    assert saved["full"] < saved["every_n"] < saved["none"], saved
    assert saved["none"] - saved["every_n"] > 0.2 * saved["none"], saved
    assert saved["every_n"] - saved["full"] > 0.2 * saved["none"], saved
    # each recomputed block gives back the same bytes (blocks of one shape)
    assert saved["none"] - saved["every_n"] == pytest.approx(saved["every_n"] - saved["full"], rel=0.05), saved


def test_layerwise_galore_accumulates_micro_batches_like_whole_model_galore(tmp_path: Path) -> None:
    """Layer-wise GaLore through the hook-reduced plan with grad_accum 2 steps like plain GaLore."""
    weights = {}
    for layerwise in (False, True):
        name = f"lw{int(layerwise)}"
        spec = one_worker_spec(
            tmp_path,
            name,
            model=DENSE,
            training="{steps: 4, batch_size: 4, grad_accum: 2, eval_every: 0, eval_bytes: 2048}",
            overrides=[
                "optim.kind=galore_adamw",
                "optim.grad_clip=0",
                "optim.galore.rank=8",
                f"optim.galore.layerwise={str(layerwise).lower()}",
                "optim.schedule.warmup=1",
            ],
        )
        trainer, _ = train(spec, tmp_path / name)
        assert type(trainer.grad_step).__name__ == ("HookReducedStep" if layerwise else "ReducedStep")
        weights[layerwise] = trainer.model.state_dict()
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_series(train_grad_norms(tmp_path / "lw1"), train_grad_norms(tmp_path / "lw0"), 1e-4, "grad_norm")
