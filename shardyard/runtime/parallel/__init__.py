"""Parallelism for one job: the dims (one device mesh), the model family's parallelize function, and
the optimizer, scheduler, gradient step and training state built beside it.

    dims = ParallelDims.from_spec(spec.parallel, topology).build(device.type)
    training = build_training(spec, model, dims, device)   # parallelizes `model` in place
    with training.step.micro_batch(last): loss = training.module(x, y); training.step.backward(loss)
    grad_norm = training.step.step()
    (pipeline parallelism: training.pipeline.forward_backward(x, y, scale) runs both passes instead)
    training.state.save(directory) / .load(directory, layout) / .layout()

Which gradient step and state a job gets follows from the spec alone: DeepSpeed's engine for
`parallel.zero` (deepspeed_zero.py, the one module that knows it), hook-reduced steps for layer-wise
GaLore and multi-worker Q-GaLore, otherwise wrapper/explicit reduction (step.ReducedStep) with DCP
state (state.DCPState).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from shardyard.comm.topology import Topology
from shardyard.optim import build_optimizer, build_scheduler
from shardyard.optim.int8_weights import prepare_model_for_optimizer
from shardyard.platform.schema import JobSpec
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.parallelize import parallelize
from shardyard.runtime.parallel.pipeline import Pipeline
from shardyard.runtime.parallel.state import (
    DCP_FORMAT,
    DCPState,
    DCPWeights,
    TrainingState,
    checkpoint_format,
    read_dcp_weights,
)
from shardyard.runtime.parallel.step import GradientStep, HookReducedStep, ReducedStep
from shardyard.runtime.parallel.tensor_parallel import head_aligned


@dataclass
class Training:
    module: nn.Module  # what the forward is called on (the model, a DDP wrapper, an engine)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: GradientStep
    state: TrainingState
    pipeline: Pipeline | None = None  # pp > 1: the schedule over this rank's stages (`module`)


def hook_reduced(spec: JobSpec, world: int) -> bool:
    """Layer-wise GaLore (any world: it also carries gradient accumulation) and multi-worker Q-GaLore
    (INT8 weights DDP cannot wrap) reduce gradients from their hooks."""
    galore = spec.optim.galore
    return galore is not None and (galore.layerwise or (spec.optim.kind == "q_galore_adamw" and world > 1))


def dims_for(spec: JobSpec, topology: Topology) -> ParallelDims:
    """The job's degrees: hook-reduced steps and DeepSpeed replicate the model they are given."""
    experts = spec.model.moe.num_experts if spec.model.kind == "moe" and spec.model.moe else 1
    dims = ParallelDims.from_spec(spec.parallel, topology, experts)
    if spec.parallel.zero or hook_reduced(spec, topology.world_size):
        dims = ParallelDims(topology, dp_replicate=topology.world_size, ep=dims.ep)
    return dims


def build_training(spec: JobSpec, model: nn.Module, dims: ParallelDims, device: torch.device) -> Training:
    """Parallelize `model` (in place) and build its optimizer, scheduler, gradient step and state
    (collective). The optimizer is built after sharding, so its state is created per shard."""
    hooks = hook_reduced(spec, dims.world_size)
    module = parallelize(model, dims, spec, device, own_reduction=hooks or bool(spec.parallel.zero))
    prepare_model_for_optimizer(model, spec.optim)  # Q-GaLore: INT8 weights replace the fp32 ones
    optimizer = build_optimizer(spec.optim, model, dims.group("world"))
    scheduler = build_scheduler(spec.optim, optimizer, spec.training.steps)
    if spec.parallel.zero:
        from shardyard.runtime.parallel.deepspeed_zero import DeepSpeedTraining

        engine = DeepSpeedTraining(spec, model, optimizer, scheduler, dims)
        return Training(engine.module, optimizer, scheduler, engine, engine)
    step: GradientStep
    if hooks:
        step = HookReducedStep(model, optimizer, scheduler, dims, spec.optim.grad_clip)
    else:
        step = ReducedStep(model, module, optimizer, scheduler, dims, spec.optim.grad_clip)
    pipeline = Pipeline(list(module), dims, spec, device) if dims.pp_enabled else None
    aligned = head_aligned(spec.model, dims.tp)  # the rows tensor parallelism reordered, for checkpoints
    state = DCPState(model, optimizer, dims, spec.parallel.shard, aligned)
    return Training(module, optimizer, scheduler, step, state, pipeline)


class WeightReader(Protocol):
    """One full weight at a time from a checkpoint, by its single-worker name; `like` gives its shape
    and dtype (a tensor on any device, the meta device included)."""

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


def open_weights(checkpoint: Path, layout: dict) -> WeightReader:
    """A reader of `checkpoint`'s weights one tensor at a time, whatever state format wrote it: what
    export streams from, so it never holds the whole model."""
    fmt = checkpoint_format(layout)
    if fmt == DCP_FORMAT:
        return DCPWeights(checkpoint)
    from shardyard.runtime.parallel import deepspeed_zero

    if fmt == deepspeed_zero.FORMAT:
        return deepspeed_zero.ZeroWeights(checkpoint)
    raise RuntimeError(f"{checkpoint}: unknown state format {fmt!r}")


def consolidated_weights(checkpoint: Path, layout: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `model` (single-worker names) from a checkpoint of any state format (one process)."""
    if checkpoint_format(layout) == DCP_FORMAT:
        return read_dcp_weights(checkpoint, model)  # one DCP read for the lot
    reader = open_weights(checkpoint, layout)
    try:
        return {name: reader.read(name, like) for name, like in model.state_dict().items()}
    finally:
        reader.close()
