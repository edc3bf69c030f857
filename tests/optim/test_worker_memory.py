"""The worker-memory prediction (a meta-device step of the job's own model and optimizer) against a
real steady-state step (the second) of the same job on the CPU.

Measured: the real tensors after one real step (parameters and buffers, `.grad`, optimizer state:
distinct storages), and the peak memory growth of that step from torch's profiler (the CPU
allocator's allocation and free events, summed in time order: `profile_memory=True`), so
neither number reads the process's RSS or the meta tracker the prediction uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.step_memory import live_peak_from, measure
from shardyard.cli.output import memory_report
from shardyard.data.tokenize import vocab_size_for
from shardyard.models import build_model
from shardyard.models.moe.experts import is_expert_shard
from shardyard.optim import build_optimizer
from shardyard.optim.int8_weights import prepare_model_for_optimizer
from shardyard.optim.meta_step import distinct_bytes
from shardyard.platform.spec import load_spec
from shardyard.runtime.parallel.parallelize import apply_activation_checkpointing
from shardyard.runtime.worker_memory import predict_with_adamw, predict_worker_memory

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.yaml"))
ONE = ["resources.workers=1", "parallel.expert_parallel=1", "parallel.shard=none", "parallel.pipeline_parallel=1"]
# architecture options the old per-block-kind table did not know: nothing here mentions them
ARCH = [
    "model.kv_heads=2",
    "model.qk_norm=head",
    "model.tie_embeddings=true",
    "model.moe.shared_experts=2",
    "model.moe.first_dense_layers=1",
    "model.moe.score=sigmoid",
]
QGALORE_LW = ["optim.kind=q_galore_adamw", "optim.galore.layerwise=true", "optim.grad_clip=0"]


def real_step(spec) -> dict[str, int]:
    """Two real steps of `spec` in this process (one worker): tensor bytes after them, the bytes held
    before the second (parameters, buffers, optimizer state), and that step's peak growth."""
    torch.manual_seed(0)
    model = build_model(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
    apply_activation_checkpointing(model, spec.training)
    prepare_model_for_optimizer(model, spec.optim)
    optimizer = build_optimizer(spec.optim, model)
    x = torch.randint(0, vocab_size_for(spec.data), (spec.training.batch_size, spec.data.seq_len))
    params = list(model.parameters())

    def state() -> int:
        return distinct_bytes(v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))

    model(x, x)[1].backward()  # the first step creates the optimizer state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = distinct_bytes(params + list(model.buffers())) + state()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x, x)[1].backward()
        optimizer.step()
    return {
        "params": distinct_bytes(params + list(model.buffers())),
        "grads": distinct_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": state(),
        "before": before,
        "peak": live_peak_from(prof),
        "experts": sum(is_expert_shard(p) for p in params),
    }


def _spec(job: str, *overrides: str):
    return load_spec(ROOT / "jobs" / job, [*ONE, *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optim.kind=sgd", "optim.momentum=0.9"],
        ["optim.kind=galore_adamw"],
        ["optim.kind=q_galore_adamw"],
        QGALORE_LW,
        ARCH,
    ],
    ids=["adamw", "sgd", "galore", "q_galore", "q_galore_layerwise", "arch_options"],
)
def test_memory_state_prediction_is_the_real_tensors_after_a_step(overrides: list[str]) -> None:
    spec = _spec("moe-tiny.yaml", *overrides)
    predicted, real = predict_worker_memory(spec), real_step(spec)
    assert (predicted.params, predicted.grads, predicted.optimizer) == (
        real["params"],
        real["grads"],
        real["optimizer"],
    )


VARIANTS = [
    ("moe-tiny.yaml", ["optim.kind=sgd", "optim.momentum=0.9"]),
    ("moe-tiny.yaml", ["optim.kind=galore_adamw"]),
    ("moe-tiny.yaml", QGALORE_LW),
    ("moe-tiny.yaml", ["training.activation_checkpointing=full"]),
    ("moe-tiny.yaml", ARCH),
]


@pytest.mark.parametrize("job, overrides", [(job, []) for job in JOBS] + VARIANTS)
def test_memory_prediction_within_15_percent_of_a_real_step_for_each_shipped_job(job: str, overrides) -> None:
    spec = _spec(job, *overrides)
    predicted, real = predict_worker_memory(spec), real_step(spec)
    measured = real["before"] + real["peak"]  # the model and optimizer state exist before the step
    prediction = predicted.params + predicted.grads + predicted.optimizer + predicted.activations
    assert abs(prediction / measured - 1) < 0.15, (job, prediction, measured)


def test_memory_q_galore_report_comes_from_the_model_the_job_builds() -> None:
    """The finding of issue 22: the report counted the fp32 copy the INT8 layers no longer hold."""
    spec = _spec("moe-tiny.yaml", *QGALORE_LW)
    p = predict_with_adamw(spec)
    assert p.adamw is not None and p.adamw.kind == "adamw"
    assert p.state / p.adamw.state < 0.3
    assert "% of AdamW's" in memory_report(p)


def _local_bytes(tensors) -> int:
    """Distinct storages of this rank's pieces (a DTensor's local shard, padded as FSDP holds it)."""
    from torch.distributed.tensor import DTensor

    return distinct_bytes(t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None)


def _rank_step(topology, overrides: list[str], out: str) -> None:
    """On each gloo rank: the job's real parallelize/optimizer/step (build_training), one step."""
    import json

    from shardyard.runtime.parallel import build_training, dims_for

    spec = load_spec(ROOT / "jobs" / "moe-tiny.yaml", overrides)
    dims = dims_for(spec, topology).build("cpu")
    torch.manual_seed(0)
    model = build_model(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
    training = build_training(spec, model, dims, torch.device("cpu"))
    x = torch.randint(0, 256, (spec.training.batch_size, spec.data.seq_len))
    with training.step.micro_batch(True):
        training.step.backward(training.module(x, x)[1])
    params = list(model.parameters())
    grads = _local_bytes(p.grad for p in params)
    training.step.step()
    state = [v for p in params for v in training.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    real = {"params": _local_bytes(params + list(model.buffers())), "grads": grads, "optimizer": _local_bytes(state)}
    if topology.rank == 0:
        Path(out).write_text(json.dumps(real))


@pytest.mark.parametrize(
    "overrides",
    [["parallel.expert_parallel=2"], ["parallel.shard=full"], ["parallel.shard=zero2"]],
    ids=["ep2", "fsdp_full", "fsdp_zero2"],
)
def test_memory_state_prediction_is_rank_zeros_real_tensors_on_two_gloo_ranks(tmp_path, overrides) -> None:
    import json

    from shardyard.comm.launch import spawn

    overrides = ["resources.workers=2", *overrides]
    out = tmp_path / "real.json"
    spawn(_rank_step, 2, 2, overrides, str(out))
    real = json.loads(out.read_text())
    predicted = predict_worker_memory(load_spec(ROOT / "jobs" / "moe-tiny.yaml", overrides))
    assert (predicted.grads, predicted.optimizer) == (real["grads"], real["optimizer"])
    # EP's token dispatcher (built from the EP group, which a prediction has none of) adds a few
    # hundred bytes of buffers
    assert 0 <= real["params"] - predicted.params <= 1024


def test_memory_prediction_without_a_meta_step_keeps_the_state(monkeypatch) -> None:
    """An op no meta kernel covers: the prediction goes on without activations (and says so)."""
    from shardyard.runtime import worker_memory

    spec = _spec("moe-tiny.yaml")
    whole = predict_worker_memory(spec)

    def fail(*args) -> int:
        raise NotImplementedError("aten::some_op: no meta kernel")

    monkeypatch.setattr(worker_memory, "_step", fail)
    partial = predict_worker_memory(spec)
    assert partial.activations == 0
    assert (partial.params, partial.grads, partial.optimizer) == (whole.params, whole.grads, whole.optimizer)


@pytest.mark.distributed
@pytest.mark.parametrize("shard", ["none", "full", "zero2"])
def test_memory_step_peak_prediction_within_12_percent_on_four_gloo_ranks(shard: str) -> None:
    """validate's per-worker tensor bytes (everything but the fixed process allowance) against the
    peak of live tensor bytes in a real step on rank 0 of 4 (benchmarks/step_memory.py: the
    profiler's allocation events): DDP, FSDP2 full and zero2 (the prediction is 0.95-0.96 of it for
    each; 0.94 at one worker). Found with it: DDP's buckets (a second copy of the gradients) and
    FSDP2's unsharded copies and buffers (full-size tensors beside the shards, several blocks at once)
    were not counted: 13-23 % under."""
    measured, predicted = measure(ROOT / "jobs" / "moe-tiny.yaml", [f"parallel.shard={shard}"], world=4)
    assert abs(predicted / measured - 1) < 0.12, (shard, predicted, measured)
