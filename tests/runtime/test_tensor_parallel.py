"""Tensor parallelism (with sequence parallelism) on real gloo process groups: TP 2 and TP 2 x FSDP 2
train like one worker (losses and gradient norms), for a dense model and an MoE with its aux losses on;
a TP 2 checkpoint resumes under FSDP 2 and expert parallelism 2 like an uninterrupted run there, and
exports the single-worker model."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from shardyard.platform.spec import load_spec_text
from tests.helpers import assert_same_series, run_cli, tiny_spec_yaml, train_grad_norms, train_losses
from tests.runtime.test_export import assert_same_weights, exported
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


def assert_trains_alike(tmp_path: Path, got: str, want: str, after: int = 0) -> None:
    """Losses and gradient norms of run `got` equal those of run `want` (its steps past `after`)."""
    for what, series in (("loss", train_losses), ("grad_norm", train_grad_norms)):
        reference = {s: v for s, v in series(tmp_path / want).items() if s > after}
        assert_same_series(series(tmp_path / got), reference, 1e-4, f"{what}: {got} vs {want}")


def test_dense_tp2_x_fsdp2_matches_one_worker_and_exports_to_hf(tmp_path: Path) -> None:
    """Tensor parallelism inside FSDP2 (2-D: dp_shard 2 x tp 2, tied embeddings split by vocabulary): the
    single worker's losses and gradient norms; its checkpoint exports the single worker's HF model."""
    run(tp_job(tmp_path, "one", DENSE, 1, every=STEPS), tmp_path / "one")
    run(
        tp_job(tmp_path, "tp2fsdp2", DENSE, 4, tp=2, shard="full", every=STEPS), tmp_path / "tp2fsdp2", ranks_per_node=2
    )
    assert_trains_alike(tmp_path, "tp2fsdp2", "one")
    exports = {}
    for name in ("one", "tp2fsdp2"):
        out = tmp_path / f"hf-{name}"
        proc = run_cli("export", str(tmp_path / name), "--format", "hf", "--out", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        exports[name] = load_file(str(out / "model.safetensors"))
    assert_same_weights(exports["tp2fsdp2"], exports["one"])


def test_moe_tp2_matches_one_worker_and_its_checkpoint_reshards(tmp_path: Path) -> None:
    """MoE with its load-balance and z losses on, GQA, a dense first block: TP 2 (one batch, its tokens
    split over the pair) trains like one worker; TP 2 x FSDP 2 like FSDP 2 (the same two batches: the aux
    loss is per batch); a TP 2 checkpoint exports the single worker's model and resumes at FSDP 2 and at
    EP 2 like the single worker's checkpoint."""
    half = STEPS // 2
    run(tp_job(tmp_path, "one", MOE, 1, every=half), tmp_path / "one")
    run(tp_job(tmp_path, "tp2", MOE, 2, tp=2, every=half), tmp_path / "tp2")
    assert_trains_alike(tmp_path, "tp2", "one")
    assert_same_weights(exported(tmp_path / "tp2", tmp_path / "x-tp2"), exported(tmp_path / "one", tmp_path / "x-one"))

    run(tp_job(tmp_path, "fsdp2", MOE, 2, shard="full"), tmp_path / "fsdp2")
    run(tp_job(tmp_path, "tp2fsdp2", MOE, 4, tp=2, shard="full"), tmp_path / "tp2fsdp2", ranks_per_node=2)
    assert_trains_alike(tmp_path, "tp2fsdp2", "fsdp2")

    # Resharding: the TP 2 checkpoint continues under FSDP 2 and under EP 2 exactly as the single
    # worker's checkpoint of the same step does (the two runs agree up to it; with the aux loss on, a
    # run trained at another data-parallel degree would not).
    for target, overrides in (("fsdp2", {"shard": "full"}), ("ep2", {"ep": 2})):
        for source in ("tp2", "one"):
            name = f"{source}-to-{target}"
            resume = tmp_path / source / f"checkpoint_{half:08d}"
            run(tp_job(tmp_path, name, MOE, 2, **overrides), tmp_path / name, resume=resume)
        assert_trains_alike(tmp_path, f"tp2-to-{target}", f"one-to-{target}", after=half)
