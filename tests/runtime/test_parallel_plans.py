"""Parallelism modes on real gloo process groups: the composed EP x FSDP2 mode against a single
worker, its per-rank state memory against DDP's, and resharding checkpoints across world size, EP
degree and sharding mode with a sample ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from shardyard import envvars
from shardyard.comm.launch import spawn
from shardyard.platform.spec import load_spec_text
from shardyard.runtime.worker import LocalReporter, Trainer
from shardyard.tracking.logger import read_metrics
from tests.helpers import assert_same_series, tiny_spec_yaml, train_grad_norms

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# aux/z losses off: they depend on how the global batch is split, and the comparisons here are exact maths.
MODEL = "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2, aux_loss: 0.0, z_loss: 0.0}}"
GLOBAL_BATCH = 8


def job(storage: Path, name: str, world: int, ep: int, shard: str, steps: int, every: int, model: str = MODEL):
    text = tiny_spec_yaml(
        name,
        storage,
        model=model,
        training=f"{{steps: {steps}, batch_size: {GLOBAL_BATCH // world}, eval_every: 0, eval_bytes: 2048}}",
        resources=f"{{workers: {world}, cpus_per_worker: 1, max_failures: 0}}",
        checkpoint=f"{{dir: {storage}, every: {every}, keep: 3}}",
    )
    return load_spec_text(
        text, overrides=[f"parallel.expert_parallel={ep}", f"parallel.shard={shard}", "optim.schedule.warmup=2"]
    )


def _rank_env(topology) -> None:
    os.environ.update(
        RANK=str(topology.rank),
        WORLD_SIZE=str(topology.world_size),
        LOCAL_RANK=str(topology.local_rank),
        **{envvars.FAKE_RANKS_PER_NODE: str(topology.ranks_per_node)},
    )


def _train(topology, spec_json: str, run_dir: str, resume: str | None, memory_out: str | None) -> None:
    from shardyard.platform.spec import spec_from_json

    _rank_env(topology)
    spec = spec_from_json(spec_json)
    trainer = Trainer(spec, Path(run_dir), LocalReporter(Path(run_dir), spec.checkpoint.keep))
    if memory_out:
        _measure_state(trainer, Path(memory_out))
        return
    trainer.resume(Path(resume) if resume else None)
    trainer.fit()


def _measure_state(trainer: Trainer, out: Path) -> None:
    """Bytes of parameters + gradients + optimizer state this rank holds after one step's backward."""
    from torch.distributed.tensor import DTensor

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    trainer.train_step()  # optimizer state exists now
    inputs, targets = trainer.loader.next_batch()
    _, ce = trainer.module(inputs, targets)
    trainer.grad_step.backward(ce)
    params = sum(local_bytes(p) for p in trainer.model.parameters())
    grads = sum(local_bytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    optim = sum(
        local_bytes(v)
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    experts = sum(local_bytes(p) for n, p in trainer.model.named_parameters() if ".experts." in n)
    rank = trainer.ctx.rank
    (out / f"rank{rank}.json").write_text(
        json.dumps({"params": params, "grads": grads, "optim": optim, "expert_params": experts})
    )


def run(
    spec, run_dir: Path, resume: Path | None = None, memory_out: Path | None = None, ranks_per_node: int | None = None
) -> list[float]:
    world = spec.resources.workers
    spawn(
        _train,
        world,
        ranks_per_node or world,
        spec.model_dump_json(),
        str(run_dir),
        str(resume) if resume else None,
        str(memory_out) if memory_out else None,
    )
    return [r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"]


def test_composed_ep2_x_shard2_matches_a_single_worker(tmp_path: Path) -> None:
    single = run(job(tmp_path, "one", 1, 1, "none", 6, 0), tmp_path / "one")
    composed = run(job(tmp_path, "ep2fsdp", 4, 2, "full", 6, 0), tmp_path / "ep2fsdp", ranks_per_node=2)
    assert len(single) == len(composed) == 6
    assert composed == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert single[-1] < single[0]
    # the gradient norm before clipping, every step: clipping (grad_clip 1) and Adam hide a scale in the losses
    assert_same_series(train_grad_norms(tmp_path / "ep2fsdp"), train_grad_norms(tmp_path / "one"), 1e-4, "grad_norm")


def test_composed_mode_holds_a_world_share_of_the_dense_state(tmp_path: Path) -> None:
    measured = {}
    for name, ep, shard in (("ddp", 1, "none"), ("composed", 2, "full")):
        out = tmp_path / f"mem-{name}"
        out.mkdir()
        run(job(tmp_path, name, 4, ep, shard, 3, 0), tmp_path / name, memory_out=out, ranks_per_node=2)
        measured[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    ddp = measured["ddp"][0]
    full_experts = ddp["expert_params"]
    dense = ddp["params"] - full_experts
    # Stated bound: dense weights/grads/AdamW moments sharded over 4 ranks, experts over EP 2 (1/2 each),
    # plus FSDP's padding of uneven shards (under 15%).
    expected_params = dense / 4 + full_experts / 2
    for rank, m in enumerate(measured["composed"]):
        assert m["params"] <= 1.15 * expected_params, (rank, m, expected_params)
        assert m["grads"] <= 1.15 * expected_params, (rank, m)
        assert m["optim"] <= 1.15 * 2 * expected_params, (rank, m)
        total = m["params"] + m["grads"] + m["optim"]
        assert total <= 0.5 * (ddp["params"] + ddp["grads"] + ddp["optim"])


def _ledger(directory: Path, steps: int | None = None) -> list[tuple[int, int]]:
    """(epoch, window) pairs every rank trained on; with `steps`, only those of the first steps."""
    pairs = []
    for f in directory.glob("*.txt"):
        lines = f.read_text().splitlines()
        if steps is not None:
            batch = GLOBAL_BATCH // int(f.stem.split("world")[1])
            lines = lines[: steps * batch]
        pairs += [(int(e), int(w)) for e, w in (line.split() for line in lines)]
    return sorted(pairs)


@pytest.mark.parametrize("target", [(4, 4, "none"), (1, 1, "none"), (4, 2, "full")], ids=["ep4", "single", "composed"])
def test_resume_reshards_and_continues_like_an_uninterrupted_run(tmp_path: Path, monkeypatch, target) -> None:
    """Save at step 4 under one layout, resume to step 8 under another: the losses are those of a run
    that used the new layout from the start, and no training window is skipped or seen twice."""
    world, ep, shard = target
    source = (2, 1, "none") if shard == "full" else (2, 2, "none")  # DDP into composed; EP 2 into the others
    ledgers = {name: tmp_path / f"ledger-{name}" for name in ("first", "resumed", "reference")}

    def traced(name: str, spec, run_dir: Path, **kwargs) -> list[float]:
        ledgers[name].mkdir()
        monkeypatch.setenv(envvars.SAMPLE_LEDGER, str(ledgers[name]))
        return run(spec, run_dir, **kwargs)

    traced("first", job(tmp_path, "first", *source, 8, 4), tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoint_00000004"
    assert json.loads((checkpoint / "meta.json").read_text())["layout"]["world"] == source[0]
    new_layout = job(tmp_path, "resumed", world, ep, shard, 8, 0)
    resumed = traced("resumed", new_layout, tmp_path / "resumed", resume=checkpoint, ranks_per_node=min(world, 2))
    reference = traced(
        "reference",
        job(tmp_path, "reference", world, ep, shard, 8, 0),
        tmp_path / "reference",
        ranks_per_node=min(world, 2),
    )
    assert len(resumed) == 4
    assert resumed == pytest.approx(reference[-4:], rel=1e-4, abs=1e-5)
    reference_norms = {s: n for s, n in train_grad_norms(tmp_path / "reference").items() if s > 4}
    assert_same_series(train_grad_norms(tmp_path / "resumed"), reference_norms, 1e-4, "grad_norm")
    windows = _ledger(ledgers["first"], steps=4) + _ledger(ledgers["resumed"])
    assert len(windows) == 8 * GLOBAL_BATCH and len(set(windows)) == len(windows)  # none seen twice
    assert sorted(windows) == _ledger(ledgers["reference"])  # and none skipped: the uninterrupted run's windows


@pytest.mark.parametrize("optim", ["galore_adamw", "q_galore_adamw"])
def test_galore_with_expert_parallelism_resumes_exactly(tmp_path: Path, optim: str) -> None:
    """EP 2 with (Q-)GaLore (per-expert projectors on each shard): a run resumed from its step-4
    checkpoint ends with the losses of the uninterrupted run."""
    overrides = {"optim": f"{{kind: {optim}, lr: 3.0e-3, schedule: {{warmup: 2}}, galore: {{rank: 8, update_gap: 3}}}}"}

    def galore_job(name: str):
        text = tiny_spec_yaml(
            name,
            tmp_path,
            model=MODEL,
            **overrides,
            training="{steps: 8, batch_size: 4, eval_every: 0, eval_bytes: 2048}",
            resources="{workers: 2, cpus_per_worker: 1, max_failures: 0}",
            checkpoint=f"{{dir: {tmp_path}, every: 4, keep: 3}}",
        )
        return load_spec_text(text, overrides=["parallel.expert_parallel=2"])

    full = run(galore_job("full"), tmp_path / "full")
    resumed = run(galore_job("resumed"), tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint_00000004")
    assert len(resumed) == 4
    assert resumed == pytest.approx(full[-4:], rel=1e-5, abs=1e-6)
    full_norms = {s: n for s, n in train_grad_norms(tmp_path / "full").items() if s > 4}
    assert_same_series(train_grad_norms(tmp_path / "resumed"), full_norms, 1e-4, "grad_norm")


OPTION_HEAVY = (
    "{kind: moe, width: 64, depth: 3, heads: 4, kv_heads: 2, qk_norm: head, qkv_bias: true, tie_embeddings: true, "
    "rope_theta: 500000.0, norm_eps: 1.0e-5, ffn: {hidden: 96}, moe: {num_experts: 4, top_k: 2, expert_hidden: 32, "
    "shared_experts: 2, shared_hidden: 16, shared_gate: true, first_dense_layers: 1, score: sigmoid, "
    "routed_scale: 2.0, aux_loss: 0.0, z_loss: 0.0}}"
)


def test_architecture_options_under_ep_and_fsdp_match_one_worker_and_reshard(tmp_path: Path) -> None:
    """GQA, qk-norm, qkv biases, tied embeddings, fine-grained sigmoid-routed experts with gated shared
    experts and a dense first layer: EP 2 and FSDP2 over 2 gloo ranks train like one worker, and an EP 2
    checkpoint resumes on one worker with the uninterrupted run's losses."""
    single = run(job(tmp_path, "one", 1, 1, "none", 6, 0, model=OPTION_HEAVY), tmp_path / "one")
    ep2 = run(job(tmp_path, "ep2", 2, 2, "none", 6, 3, model=OPTION_HEAVY), tmp_path / "ep2")
    fsdp = run(job(tmp_path, "fsdp", 2, 1, "full", 6, 0, model=OPTION_HEAVY), tmp_path / "fsdp")
    assert len(single) == len(ep2) == len(fsdp) == 6
    assert ep2 == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert fsdp == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert single[-1] < single[0]
    resumed = run(
        job(tmp_path, "resumed", 1, 1, "none", 6, 0, model=OPTION_HEAVY),
        tmp_path / "resumed",
        resume=tmp_path / "ep2" / "checkpoint_00000003",
    )
    assert resumed == pytest.approx(single[-3:], rel=1e-4, abs=1e-5)
