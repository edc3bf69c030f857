"""Pipeline parallelism on real gloo process groups: each schedule, alone and with expert parallelism,
trains like one worker (losses, gradient norms and the held-out figure, MoE aux and z losses
included), and a pipeline checkpoint resumes under another layout like an uninterrupted run there.

The single-worker reference reads the same windows in the same micro-batches: a pipeline splits each
replica's batch of B sequences into m micro-batches, so the reference runs batch B / m with grad_accum
m (x the data-parallel degree, whose replicas read consecutive blocks of B windows). The aux losses
depend on how tokens are grouped, so this is the grouping under which they must agree exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardyard import envvars
from shardyard.platform.spec import load_spec_text
from tests.helpers import assert_same_series, tiny_spec_yaml, train_grad_norms
from tests.runtime.test_parallel_plans import run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

MOE = "{kind: moe, width: 32, depth: 4, heads: 2, ffn: {hidden: 64}, moe: {num_experts: 4, top_k: 2}}"
DENSE = "{kind: dense, width: 32, depth: 4, heads: 2, ffn: {hidden: 64}}"
BATCH, MICRO, STEPS = 4, 2, 10  # sequences per replica and step, micro-batches, steps


def pp_job(
    storage: Path,
    name: str,
    model: str,
    workers: int,
    pp: int = 1,
    ep: int = 1,
    batch: int = BATCH,
    accum: int = 1,
    steps: int = STEPS,
    every: int = 0,
    **fields: str,
):
    """A job of `workers` ranks; `fields`: more overrides (`parallel__pipeline__schedule=...`)."""
    text = tiny_spec_yaml(
        name,
        storage,
        model=model,
        data="{paths: [stdlib], seq_len: 32, max_bytes: 400000}",
        training=f"{{steps: {steps}, batch_size: {batch}, grad_accum: {accum}, eval_every: 0, eval_bytes: 1024}}",
        resources=f"{{workers: {workers}, cpus_per_worker: 1, max_failures: 0}}",
        checkpoint=f"{{dir: {storage}, every: {every}, keep: 3}}",
    )
    overrides = [f"parallel.pipeline_parallel={pp}", f"parallel.expert_parallel={ep}", "optim.schedule.warmup=2"]
    overrides += [f"parallel.pipeline.microbatches={MICRO}"] + [
        f"{k.replace('__', '.')}={v}" for k, v in fields.items()
    ]
    return load_spec_text(text, overrides=overrides)


def one_worker(storage: Path, model: str, replicas: int = 1):
    """The single-worker reference: the pipeline's micro-batches as accumulation steps, in order."""
    return pp_job(storage, "one", model, 1, batch=BATCH // MICRO, accum=MICRO * replicas)


def eval_bpb(run_dir: Path) -> float:
    from shardyard.tracking.logger import read_metrics

    return [r["val_bpb"] for r in read_metrics(run_dir) if r.get("kind") == "eval"][-1]


def assert_trains_like(run_dir: Path, reference: Path, got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert_same_series(train_grad_norms(run_dir), train_grad_norms(reference), 1e-4, "grad_norm")
    assert eval_bpb(run_dir) == pytest.approx(eval_bpb(reference), rel=1e-4)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory) -> tuple[Path, list[float]]:
    directory = tmp_path_factory.mktemp("moe-one")
    losses = run(one_worker(directory, MOE), directory / "run")
    assert losses[-1] < losses[0]
    return directory / "run", losses


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_pp2_trains_like_one_worker_moe_losses_included(tmp_path: Path, moe_reference, schedule: str) -> None:
    """Every micro-batch's aux and z losses weighted once under each schedule: the interleaved one runs
    two stages per rank (4 stages of one block), with forwards and backwards of different micro-batches
    interleaved on a rank."""
    reference, want = moe_reference
    got = run(pp_job(tmp_path, "pp2", MOE, 2, pp=2, parallel__pipeline__schedule=schedule), tmp_path / "pp2")
    assert_trains_like(tmp_path / "pp2", reference, got, want)


def test_pp2_dense_trains_like_one_worker(tmp_path: Path) -> None:
    want = run(one_worker(tmp_path, DENSE), tmp_path / "one")
    got = run(pp_job(tmp_path, "pp2", DENSE, 2, pp=2), tmp_path / "pp2")
    assert_trains_like(tmp_path / "pp2", tmp_path / "one", got, want)


def test_pp2_x_ep2_x_fsdp2_trains_like_one_worker(tmp_path: Path) -> None:
    """4 ranks: two pipelines (data-parallel replicas); each stage's experts split over its 2 ranks
    (EP 2) and its dense weights sharded over them (FSDP2, each stage a root)."""
    want = run(one_worker(tmp_path, MOE, replicas=2), tmp_path / "one")
    spec = pp_job(tmp_path, "composed", MOE, 4, pp=2, ep=2, parallel__shard="full")
    got = run(spec, tmp_path / "composed", ranks_per_node=2)
    assert_trains_like(tmp_path / "composed", tmp_path / "one", got, want)


@pytest.mark.parametrize("model", ["moe", "dense"])
def test_pp2_x_tp2_trains_like_one_worker(tmp_path: Path, moe_reference, model: str) -> None:
    """4 ranks: one pipeline of 2 stages, each stage tensor parallel over 2 ranks (heads and MLPs split,
    the sequence split between sub-layers, an MoE's tokens split with its aux losses averaged over the
    pair); the activations between stages are each tp rank's sequence shard."""
    if model == "moe":
        reference, want = moe_reference
    else:
        reference = tmp_path / "one"
        want = run(one_worker(tmp_path, DENSE), reference)
    spec = pp_job(tmp_path, "pp2tp2", MOE if model == "moe" else DENSE, 4, pp=2, parallel__tensor_parallel=2)
    got = run(spec, tmp_path / "pp2tp2", ranks_per_node=4)
    assert_trains_like(tmp_path / "pp2tp2", reference, got, want)


def _windows(ledger: Path, steps: int | None = None, per_step: int = BATCH) -> list[tuple[int, int]]:
    """(epoch, window) pairs the ranks trained on, in each rank's order; with `steps`, the first steps'."""
    pairs = []
    for f in sorted(ledger.glob("*.txt")):
        lines = f.read_text().splitlines()
        lines = lines if steps is None else lines[: steps * per_step]
        pairs += [(int(e), int(w)) for e, w in (line.split() for line in lines)]
    return pairs


def test_pp2_x_tp2_checkpoint_resumes_at_ep2_like_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    """Saved at step 3 by a pipeline of 2 whose stages are tensor parallel over 2 ranks (4 ranks), resumed
    to step 6 by 2 expert-parallel ranks without a pipeline or TP (each reading one of the pipeline's
    micro-batches): the losses and gradient norms of a run that used EP 2 from the start, every window
    once (one rank records them: the first stage's first TP rank); and `export` of the 4-rank run's
    final checkpoint is the EP 2 run's model."""
    ledgers = {name: tmp_path / f"ledger-{name}" for name in ("first", "resumed", "reference")}

    def traced(name: str, spec, **kwargs) -> list[float]:
        ledgers[name].mkdir()
        monkeypatch.setenv(envvars.SAMPLE_LEDGER, str(ledgers[name]))
        return run(spec, tmp_path / name, **kwargs)

    traced("first", pp_job(tmp_path, "first", MOE, 4, pp=2, steps=6, every=3, parallel__tensor_parallel=2))
    checkpoint = tmp_path / "first" / "checkpoint_00000003"
    ep2 = {"ep": 2, "batch": BATCH // 2, "steps": 6}
    resumed = traced("resumed", pp_job(tmp_path, "resumed", MOE, 2, **ep2), resume=checkpoint)
    reference = traced("reference", pp_job(tmp_path, "reference", MOE, 2, **ep2))
    assert len(resumed) == 3
    assert resumed == pytest.approx(reference[-3:], rel=1e-4, abs=1e-6)
    norms = {s: n for s, n in train_grad_norms(tmp_path / "reference").items() if s > 3}
    assert_same_series(train_grad_norms(tmp_path / "resumed"), norms, 1e-4, "grad_norm")
    windows = _windows(ledgers["first"], steps=3) + _windows(ledgers["resumed"])
    assert len(windows) == 6 * BATCH and len(set(windows)) == len(windows)  # none twice
    assert sorted(windows) == sorted(_windows(ledgers["reference"]))  # none skipped
    # export consolidates the pipeline's checkpoint into the single-worker model: the EP 2 run's weights
    from safetensors.torch import load_file

    from shardyard.runtime.export import export
    from tests.runtime.test_export import assert_same_weights

    pipelined = load_file(str(export(tmp_path / "first", tmp_path / "export-pp2")))
    assert_same_weights(pipelined, load_file(str(export(tmp_path / "reference", tmp_path / "export-ep2"))))


@pytest.mark.ray
def test_shardyard_run_of_the_pipeline_job_trains(tmp_path: Path) -> None:
    """`shardyard run jobs/moe-pipeline.yaml` (2 Ray workers, interleaved 1F1B over 4 stages): the
    loss falls, every MoE layer of both ranks is reported (rank 0 holds two of the four), and the step
    anatomy shows the bubble as its own part."""
    from shardyard.tracking.expert_load import read_expert_load
    from shardyard.tracking.logger import read_metrics
    from tests.helpers import ROOT, run_job, train_losses

    sets = [f"checkpoint.dir={tmp_path}", "training.steps=16", "optim.schedule.warmup=2", "training.log_every=4"]
    sets += ["training.eval_bytes=4096", "data.max_bytes=1000000"]
    proc = run_job(ROOT / "jobs" / "moe-pipeline.yaml", *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "moe-pipeline"
    losses = train_losses(run_dir)
    assert sorted(losses) == [4, 8, 12, 16] and losses[16] < losses[4] - 0.3, losses
    last = [r for r in read_metrics(run_dir) if r.get("kind") == "train"][-1]
    assert all(last[f"moe/layer{i}/util_max"] > 0 for i in range(4)) and last["aux_loss"] > 0
    assert last["time/bubble_ms"] > 0 and last["time/forward_ms"] > 0 and last["time/backward_ms"] > 0
    steps, per_layer = read_expert_load(run_dir)
    assert len(per_layer) == 4 and all(counts.sum() > 0 for counts in per_layer)
