"""Predicted memory of one worker, from the model and optimizer the job builds, checked against what
the worker is given before anything starts.

`predict_worker_memory(spec)` runs one training step on the meta device (optim.meta_step: no data,
no memory) with the job's own pieces, in the order runtime.parallel.build_training uses them:

1. the model from the job's builder (`build_meta_model`: models.build_model on the meta device);
2. expert placement with parallelize's own `keep_expert_slice_` (this rank's E/ep slice of every
   MoE layer's stacked experts, marked as expert shards) and `apply_activation_checkpointing`; the
   degrees come from `runtime.parallel.dims_for` (the ParallelDims the job would build, so
   hook-reduced optimizers and ZeRO replicate dense weights as they do in the job);
3. `prepare_model_for_optimizer` (Q-GaLore: INT8 weights replace the fp32 ones) and
   `build_optimizer`: the real optimizer;
4. two steps of forward (balanced routing), backward, `optimizer.step()` (layer-wise GaLore steps
   from its hooks during backward, as in the job) under `MetaMemoryMode`, which counts live bytes;
   the second (steady-state: the optimizer state exists) is the one measured.

Parts, per worker:

- parameters: distinct storages of the model's parameters and buffers (INT8 codes and scales
  included); gradients: the `.grad` storages held after the step (none in layer-wise mode: they are
  freed as each parameter steps), twice under DDP (its all-reduce buckets are a second copy, held
  from the first step on); optimizer state: every tensor in `optimizer.state`.
- activations: the second step's peak live bytes beyond those three (kept activations, a recomputed
  block under activation checkpointing, layer-wise gradients in flight, optimizer temporaries), so
  the total is the steady-state peak of a step.
- sharding of the dense part over `dims.dp_shard` ranks (FSDP2, as `apply_fsdp`: every parameter
  not marked as an expert shard, split on dim 0 into ceil(dim0 / dp_shard) rows per rank, with its
  gradient and optimizer state; scalar state is not split); what FSDP allocates beyond the shards is
  added to the activations (`_gathered`: the root's unsharded parameters, and seven of the largest
  block's under `full`: parameters in computation and in flight, gradients and their reduce-scatter
  input, buffers kept between steps; every block's and four of the largest under `zero2`); ZeRO
  stages partition the optimizer state (1), gradients (2) and parameters (3) over the world.
- tensor parallelism (runtime.parallel.tensor_parallel): the parameters its plan splits (embedding,
  head, attention projections, dense MLPs: `tp_share`) count 1/tp, with their gradients and optimizer
  state, before FSDP splits the rest; the step's activations count 1/tp (with sequence parallelism
  every activation of a block is split over tp: Korthikanti et al. 2022, eq. 5).
- under EP > 1 the step runs on the unsliced model (balanced routing gives each rank the same
  number of expert rows either way) and the state is counted on the sliced one.
- under pipeline parallelism (pp > 1) the worker is rank 0: its model is pruned to its stages by
  pipeline.split_into_stages (the state counted is theirs) and the step runs its stages on one
  micro-batch (training.batch_size / microbatches sequences); the activations are that micro-batch's
  times the micro-batches the schedule keeps in flight on the first stage (`in_flight`: min(m, p)
  for 1f1b, m for gpipe, v x min(m, p) for interleaved_1f1b).
- a model with an op no meta kernel covers is predicted without activations (logged).
- a fixed `PROCESS_BYTES` for the Python, torch and Ray worker process itself.

`check_worker_memory` raises SpecError when the total exceeds `resources.memory_per_worker` (or this
machine's RAM when that is unset), naming the part and the spec field that drive the size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from shardyard.platform.errors import SpecError
from shardyard.platform.schema import JobSpec

log = logging.getLogger(__name__)

PROCESS_BYTES = 512 * 2**20
GIB = 2**30


@dataclass
class MemoryPrediction:
    params: int
    grads: int
    optimizer: int
    activations: int
    process: int
    expert_fraction: float  # of parameter bytes
    kind: str = ""  # the optimizer
    adamw: MemoryPrediction | None = field(default=None, repr=False)  # the same job under AdamW

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.process

    @property
    def state(self) -> int:
        """Parameters, gradients and optimizer state."""
        return self.params + self.grads + self.optimizer

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "process": self.process,
        }

    def render(self) -> str:
        items = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts().items())
        return f"{self.total / GIB:.2f} GiB ({items} GiB)"


# ------------------------------------------------------------------------------ the meta step
def _dims(spec: JobSpec):
    """The ParallelDims the job builds on rank 0 (validated, no mesh)."""
    from shardyard.comm.topology import Topology
    from shardyard.runtime.parallel import dims_for

    workers = spec.resources.min_workers  # an elastic group's fewest workers hold the most each
    return dims_for(spec, Topology(world_size=workers, rank=0, node_rank=0, local_rank=0, ranks_per_node=workers))


@dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stages: list[nn.Module]  # pipeline parallelism: the rank's stages (over the pruned model's modules)


def _prepared(spec: JobSpec, ep: int, source: str, dims) -> Prepared:
    """The job's model on the meta device, placed and prepared as build_training does, and its optimizer
    (under pipeline parallelism pruned to `dims`' rank's stages)."""
    from shardyard.models.moe.layer import MoELayer
    from shardyard.optim import build_optimizer
    from shardyard.optim.int8_weights import prepare_model_for_optimizer
    from shardyard.runtime.parallel.parallelize import apply_activation_checkpointing, keep_expert_slice_
    from shardyard.runtime.parallel.pipeline import split_into_stages

    model = build_meta_model(spec, source)
    stages = split_into_stages(model, dims, spec.parallel.pipeline) if dims.pp_enabled else []
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        if layer.num_experts % ep:
            raise SpecError(f"{source}: parallel.expert_parallel ({ep}) must divide num_experts ({layer.num_experts})")
        if ep > 1:  # place_experts' slice on rank 0 (every rank holds the same number)
            keep_expert_slice_(layer.experts, 0, layer.num_experts // ep)
    for root in [model, *stages]:
        apply_activation_checkpointing(root, spec.training)
    prepare_model_for_optimizer(model, spec.optim)
    model.train()
    return Prepared(model, build_optimizer(spec.optim, model), stages)


def in_flight(spec: JobSpec) -> int:
    """Micro-batches whose activations the first pipeline stage holds at its peak."""
    pp, pipe = spec.parallel.pipeline_parallel, spec.parallel.pipeline
    if pp == 1:
        return 1
    if pipe.schedule == "gpipe":
        return pipe.microbatches
    return min(pipe.microbatches, pp) * (pipe.virtual_stages if pipe.schedule == "interleaved_1f1b" else 1)


def _state_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    return [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


def _fsdp_fraction(p: torch.Tensor, dp_shard: int) -> float:
    """This rank's share of a parameter FSDP2 shards on dim 0 (ceil(dim0 / dp_shard) rows, padded)."""
    if dp_shard == 1 or p.dim() == 0:
        return 1.0
    return math.ceil(p.shape[0] / dp_shard) / p.shape[0]


def _step(spec: JobSpec, prepared: Prepared) -> int:
    """Peak bytes a training step allocates beyond the optimizer state (which the first step creates),
    measured on the second step: forward, backward, optimizer step. The gradients it leaves stay."""
    from shardyard.optim.meta_step import MetaMemoryMode, fused_attention

    model, optimizer, stages = prepared.model, prepared.optimizer, prepared.stages
    rows = spec.training.batch_size // (spec.parallel.pipeline.microbatches if stages else 1)
    x = torch.zeros(rows, spec.data.seq_len, dtype=torch.long, device="meta")
    with fused_attention(), MetaMemoryMode() as mode:
        for step in range(2):
            if step:
                optimizer.zero_grad(set_to_none=True)
                start = mode.live
                mode.reset_peak()
            if stages:  # each of this rank's stages on one micro-batch (activations from the previous rank)
                for stage in stages:
                    width = spec.model.width
                    inputs = x if stage.embed is not None else torch.zeros(*x.shape, width, device="meta")
                    stage(inputs.requires_grad_(stage.embed is None)).float().sum().backward()
            else:
                model(x, x)[1].backward()
            optimizer.step()
        return mode.peak - start


def _give_grads(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state the optimizer creates, without a forward: a gradient per parameter, then the step."""
    from shardyard.optim.meta_step import MetaMemoryMode

    with MetaMemoryMode():
        params = [p for p in model.parameters() if p.requires_grad]
        if getattr(optimizer, "layerwise", False):
            for p in params:
                p.grad = torch.empty_like(p)
                optimizer.step_param(p)
                p.grad = None
            return
        for p in params:
            p.grad = torch.empty_like(p)
        optimizer.step()


def predict_worker_memory(spec: JobSpec, model: nn.Module | None = None, source: str = "<spec>") -> MemoryPrediction:
    """Per-worker memory of `spec` (see the module docstring). `model` is not used: the prediction
    builds the job's model itself (it is placed, prepared and stepped, so it cannot be shared)."""
    from shardyard.models.moe.experts import is_expert_shard
    from shardyard.models.moe.layer import MoELayer
    from shardyard.optim.meta_step import distinct_bytes
    from shardyard.runtime.parallel import hook_reduced
    from shardyard.runtime.parallel.parallelize import uses_ddp
    from shardyard.runtime.parallel.tensor_parallel import tp_share

    try:
        dims = _dims(spec)
    except ValueError as err:
        raise SpecError(f"{source}: parallel: {err}") from None
    placed = _prepared(spec, dims.ep, source, dims)
    # the step runs on the unsliced model under EP (balanced routing gives each rank the same number
    # of expert rows either way); the state is counted on this rank's slice
    stepped = placed if dims.ep == 1 else _prepared(spec, 1, source, dims)
    try:
        peak: int | None = _step(spec, stepped)
        held = _unsharded_held(stepped.model, stepped.optimizer, grads_only=True)
    except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel: state only
        log.warning("%s: memory predicted without activations (the meta-device step failed: %s)", source, err)
        peak, held = None, 0
        placed = _prepared(spec, dims.ep, source, dims)
    del stepped
    model, optimizer = placed.model, placed.optimizer
    if peak is None or dims.ep > 1:
        _give_grads(model, optimizer)
    experts = {id(p) for layer in model.modules() if isinstance(layer, MoELayer) for p in layer.experts.parameters()}
    params = grads = state = expert = 0.0
    counted: set[int] = set()
    for name, p in model.named_parameters():
        key = p.untyped_storage()._cdata
        if key in counted:
            continue
        counted.add(key)
        # apply_fsdp: expert shards (ep > 1) stay outside FSDP; everything else is split on dim 0
        # (after tensor parallelism split what its plan splits)
        fraction = 1.0 if is_expert_shard(p) else _fsdp_fraction(p, dims.dp_shard) * tp_share(name, dims.tp)
        own = distinct_bytes([p])
        params += own * fraction
        expert += own * fraction if id(p) in experts else 0
        grads += distinct_bytes([p.grad] if p.grad is not None else []) * fraction
        for t in _state_tensors(optimizer, p):  # a scalar (AdamW's step) is not sharded
            state += distinct_bytes([t]) * (fraction if t.dim() else 1.0)
    if uses_ddp(dims, hook_reduced(spec, dims.world_size) or bool(spec.parallel.zero)):
        grads *= 2  # DDP's all-reduce buckets: a copy of every gradient, held from the first step on
    if peak is not None and dims.tp_enabled:
        peak = held + (peak - held) / dims.tp  # sequence parallelism splits every activation over tp
    if peak is not None and dims.fsdp_enabled:
        peak += _gathered(spec, model, dims.tp)
    buffers = distinct_bytes(list(model.buffers()))  # INT8 codes and scales, router biases, counters
    total_params = params + buffers
    if spec.parallel.zero:  # ZeRO partitions the replicated state over the world
        z_params, z_grads, z_state = spec.parallel.sharded_state()
        world = dims.world_size
        total_params, grads, state = (
            v / world if on else v for v, on in ((total_params, z_params), (grads, z_grads), (state, z_state))
        )
    return MemoryPrediction(
        int(total_params),
        int(grads),
        int(state),
        0 if peak is None else max(0, int(peak - held)) * in_flight(spec),
        PROCESS_BYTES,
        expert / max(1.0, params + buffers),
        spec.optim.kind,
    )


def _gathered(spec: JobSpec, model: nn.Module, tp: int) -> int:
    """What FSDP2 allocates beyond the shards (each unsharded copy is a new tensor of the parameter's
    full size; the shards stay): the root's own parameters (embedding, head, final norm), unsharded
    from the first forward to the end of backward, and
    - `parallel.shard: full`: seven times the largest block: in the step its unsharded parameters
      while it computes, the next block's all-gather output and the copy-out from it (FSDP2 gathers
      one block ahead), the block's unsharded gradients and their reduce-scatter input; between steps
      the last reduce-scatter's input and the last all-gather's output, kept for the next step;
    - `zero2` (no reshard after forward): every block's unsharded parameters from forward to backward,
      and four times the largest block (an all-gather output, unsharded gradients, their
      reduce-scatter input, the one kept between steps).
    Fitted to the profiler's allocation events on 4 gloo ranks (tests/optim/test_worker_memory.py;
    both are per block, so they do not grow with depth). Expert shards (ep > 1) are outside FSDP."""
    from shardyard.models.moe.experts import is_expert_shard
    from shardyard.models.transformer import Block
    from shardyard.runtime.parallel.tensor_parallel import tp_share

    def unsharded(named: list[tuple[str, nn.Parameter]]) -> float:
        return sum(p.numel() * p.element_size() * tp_share(name, tp) for name, p in named if not is_expert_shard(p))

    blocks = [(name, b) for name, b in model.named_modules() if isinstance(b, Block)]
    per_block = [unsharded([(f"{name}.{n}", p) for n, p in b.named_parameters()]) for name, b in blocks]
    in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
    root = unsharded([(n, p) for n, p in model.named_parameters() if id(p) not in in_blocks])
    largest = max(per_block, default=0.0)
    if spec.parallel.shard == "zero2":
        return int(root + sum(per_block) + 4 * largest)
    return int(root + 7 * largest)


def _unsharded_held(model: nn.Module, optimizer: torch.optim.Optimizer, grads_only: bool = False) -> int:
    """Gradients (and optimizer state) the step leaves, before any sharding."""
    from shardyard.optim.meta_step import distinct_bytes

    params = list(model.parameters())
    grads = distinct_bytes(p.grad for p in params if p.grad is not None)
    return grads if grads_only else grads + distinct_bytes(t for p in params for t in _state_tensors(optimizer, p))


def node_memory_bytes() -> int:
    """This machine's physical RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _driving_field(spec: JobSpec, prediction: MemoryPrediction) -> str:
    """The spec field to change, for the largest part of the prediction."""
    m, t = spec.model, spec.training
    state = prediction.params + prediction.grads + prediction.optimizer
    if prediction.process > state + prediction.activations:
        return (
            f"a worker process itself (Python, torch, Ray) needs about {prediction.process / GIB:.1f} GiB: raise "
            "resources.memory_per_worker"
        )
    if prediction.activations > state:
        return (
            f"activations are the largest part, driven by training.batch_size ({t.batch_size}) x data.seq_len "
            f"({spec.data.seq_len}): lower training.batch_size (training.grad_accum keeps the tokens per step)"
            + ("" if m.stages else " or set training.activation_checkpointing: full")
        )
    head = f"parameters, gradients and optimizer state ({state / GIB:.2f} GiB) are the largest part"
    advice = "; shard them over the workers with parallel.shard: full" if not any(spec.parallel.sharded_state()) else ""
    if prediction.expert_fraction > 0.5:
        moe = m.moe or next((s.moe for s in m.stages or [] if s.moe), None)
        field = "model.moe.num_experts" if m.moe else "model.stages[*].moe.num_experts"
        return (
            f"{head}, mostly expert weights, driven by {field} ({moe.num_experts if moe else '?'}): use fewer "
            "experts or shard them with parallel.expert_parallel"
        )
    if m.stages:
        sizes = [s.width * s.width * s.depth for s in m.stages]
        i = sizes.index(max(sizes))
        return (
            f"{head}, driven by model.stages[{i}].width ({m.stages[i].width}) and depth ({m.stages[i].depth})" + advice
        )
    return (
        f"{head}, driven by model.width ({m.width}) and model.depth ({m.depth})"
        + (f" (preset {m.preset})" if m.preset else "")
        + advice
    )


def check_worker_memory(
    spec: JobSpec, prediction: MemoryPrediction, source: str = "<spec>", available: int | None = None
) -> MemoryPrediction:
    """`prediction`, or SpecError when it exceeds what a worker is given."""
    given = spec.resources.memory_per_worker_bytes
    if available is None:
        available = given if given is not None else node_memory_bytes()
    if prediction.total > available:
        limit = (
            f"resources.memory_per_worker ({spec.resources.memory_per_worker})"
            if given is not None
            else f"this machine's RAM ({available / GIB:.1f} GiB; set resources.memory_per_worker for the "
            "cluster's workers)"
        )
        raise SpecError(
            f"{source}: predicted memory per worker {prediction.render()} exceeds {limit}; "
            f"{_driving_field(spec, prediction)}"
        )
    return prediction


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Initialisers do nothing while a meta model is built (meta tensors have no values, but each
    call still costs ~1 ms of dispatch: most of `validate`'s time)."""
    from torch.nn import init

    names = ("normal_", "zeros_", "ones_", "uniform_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_")
    saved = {name: getattr(init, name) for name in names}
    for name in names:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


MAX_BLOCKS = 4096  # transformer blocks in one model; the deepest published models have a few hundred


def build_meta_model(spec: JobSpec, source: str = "<spec>") -> nn.Module:
    """The spec's model on the meta device (no memory), or SpecError when it cannot be built: more
    than MAX_BLOCKS blocks (building would take hours), or sizes no tensor can have."""
    import torch

    from shardyard.models import build_model

    m = spec.model
    if m.stages:
        blocks, field = sum(s.depth for s in m.stages), "model.stages[*].depth"
    else:
        blocks, field = m.depth, "model.depth"
    if blocks > MAX_BLOCKS:
        raise SpecError(f"{source}: {field}: {blocks} transformer blocks in all; at most {MAX_BLOCKS} are supported")
    from shardyard.data.tokenize import vocab_size_for

    vocab_size = vocab_size_for(spec.data)  # 256 for bytes; the tokenizer's vocabulary otherwise
    try:
        with torch.device("meta"), _no_weight_init():
            return build_model(m, spec.data.seq_len, vocab_size)
    except (OverflowError, RuntimeError, TypeError, ValueError, MemoryError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SpecError(
            f"{source}: model: cannot be built at these sizes (model.width {m.width}, ffn hidden "
            f"{m.ffn_hidden}, data.seq_len {spec.data.seq_len}): {first}"
        ) from None


def predict_with_adamw(spec: JobSpec, source: str = "<spec>") -> MemoryPrediction:
    """The prediction, with the same job under plain AdamW beside it (for the report)."""
    prediction = predict_worker_memory(spec, source=source)
    if spec.optim.kind == "adamw":
        prediction.adamw = prediction
    else:
        adamw = spec.model_copy(update={"optim": spec.optim.model_copy(update={"kind": "adamw", "galore": None})})
        prediction.adamw = predict_worker_memory(adamw, source=source)
    return prediction


def activation_bytes(spec: JobSpec) -> int:
    """The activation part of the prediction: the step's peak beyond parameters, gradients and state."""
    return predict_worker_memory(spec).activations


def check_spec_memory(spec: JobSpec, source: str = "<spec>") -> MemoryPrediction:
    """The spec's prediction (its model and optimizer stepped on the meta device: no memory), or
    SpecError when it exceeds what a worker is given."""
    return check_worker_memory(spec, predict_with_adamw(spec, source), source)
