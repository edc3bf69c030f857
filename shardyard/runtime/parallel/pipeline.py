"""Pipeline parallelism for the flat models: blocks split into stages, run by a torch.distributed.pipelining
schedule over the dims' `pp` group.

    stages = split_into_stages(model, dims, spec.parallel.pipeline)   # prunes `model` to this rank's part
    ... experts, activation checkpointing, FSDP2 over each stage (parallelize) ...
    pipeline = Pipeline(stages, dims, spec, device)
    ce = pipeline.forward_backward(inputs, targets, scale=1 / grad_accum)   # every micro-batch, both passes
    logits = pipeline.logits(inputs)                                        # evaluation (last stage; else None)

Stage s of S holds blocks `layers[s]`; stage 0 also the embedding, stage S-1 the final norm and the
head. A pipeline rank holds stages pp_rank, pp_rank + pp, ... (`stages_per_rank` of them, looped as the
interleaved schedules expect). The rank's model is pruned in place to the parts its stages hold, with
the whole model's parameter names (`stack.blocks.<i>` keeps its index), so optimizer, state dict and
DCP checkpoints see canonical names and reshard to any other layout. The stage modules hold the same
parameter objects; they are what the schedule calls and what FSDP2 wraps as roots.

The loss and the MoE auxiliary losses are weighted per micro-batch: the loss function returns a
micro-batch's mean cross-entropy times scale / microbatches (the schedule's own gradient scaling is
off: it would rescale gradients accumulated over earlier calls), and every MoE layer's AttachAuxLoss
takes the same weight from the moe_scope the schedule runs in, once per micro-batch and stage, whatever
the order in which the schedule runs forwards and backwards.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.models.moe.accounting import moe_scope
from shardyard.models.transformer import run_blocks
from shardyard.platform.schema import JobSpec, PipelineSpec
from shardyard.runtime.parallel.dims import ParallelDims


def stage_layers(depth: int, stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Blocks of each stage: `layers_per_stage`, or as even as possible with the extra blocks going to
    the stages after the first (which also runs the embedding)."""
    if layers_per_stage is None:
        base, extra = divmod(depth, stages)
        layers_per_stage = [base + (1 if 0 < s <= extra else 0) for s in range(stages)]  # extra < stages
    if len(layers_per_stage) != stages or sum(layers_per_stage) != depth or min(layers_per_stage) < 1:
        raise ValueError(f"layers per stage {layers_per_stage}: need {stages} stages of >= 1 block, {depth} in all")
    starts = [sum(layers_per_stage[:s]) for s in range(stages)]
    return [range(start, start + n) for start, n in zip(starts, layers_per_stage)]


def rank_stages(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stage indices a pipeline rank holds (looped: pp_rank, pp_rank + pp, ...)."""
    return [pp_rank + v * pp for v in range(per_rank)]


def bubble_fraction(schedule: str, pp: int, microbatches: int, per_rank: int = 1) -> float:
    """Idle share of a pipeline step with equal stage times: (p-1)/(m+p-1) for 1f1b and gpipe,
    (p-1)/(v m + p-1) for interleaved_1f1b with v stages per rank (Narayanan et al. 2021)."""
    v = per_rank if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * microbatches + pp - 1)


class StageModule(nn.Module):
    """One stage of a flat model: (embedding) -> its blocks -> (final norm, head); the modules are the
    model's own (shared parameters), registered here so the schedule and FSDP2 see the stage."""

    def __init__(self, model: nn.Module, index: int, layers: range, last: bool) -> None:
        super().__init__()
        self.index = index
        self.embed = model.embed if index == 0 else None
        self.blocks = nn.ModuleDict({str(i): model.stack.blocks[str(i)] for i in layers})
        self.norm = model.stack.norm if last else None
        self.head = model.head if last else None
        self.register_buffer("rope_cos", model.stack.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.stack.rope_sin, persistent=False)
        self.checkpoint_every = 0  # activation checkpointing (parallelize sets it as on a stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        blocks = ((int(name), block) for name, block in self.blocks.items())
        x = run_blocks(blocks, x, (self.rope_cos, self.rope_sin), self.checkpoint_every)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def rank_blocks(depth: int, dims: ParallelDims, pipeline: PipelineSpec) -> set[int]:
    """The blocks (whole-model indices) this pipeline rank's stages hold."""
    layers = stage_layers(depth, dims.pp * pipeline.virtual_stages, pipeline.layers_per_stage)
    return {i for s in rank_stages(dims.pp_rank, dims.pp, pipeline.virtual_stages) for i in layers[s]}


def split_into_stages(model: nn.Module, dims: ParallelDims, pipeline: PipelineSpec) -> list[StageModule]:
    """Prune `model` (a flat transformer, in place) to this pipeline rank's stages and return them. The
    blocks of other stages may be on the meta device (built so: `rank_blocks`); they are dropped."""
    stages = dims.pp * pipeline.virtual_stages
    layers = stage_layers(len(model.stack.blocks), stages, pipeline.layers_per_stage)
    mine = rank_stages(dims.pp_rank, dims.pp, pipeline.virtual_stages)
    blocks = model.stack.blocks
    model.stack.blocks = nn.ModuleDict({str(i): blocks[i] for s in mine for i in layers[s]})  # canonical names
    if 0 not in mine:
        model.embed = None
    if stages - 1 not in mine:
        model.stack.norm = None
        model.head = None
    return [StageModule(model, s, layers[s], last=s == stages - 1) for s in mine]


def timed_stage_class() -> type:
    """torch's PipelineStage, timing the compute the schedule asks of it (forward and backward of one
    micro-batch; host clock): the rest of a schedule step is waiting on the other stages -- the bubble
    and the activation transfers."""
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.compute_s = {"forward": 0.0, "backward": 0.0}

        def forward_one_chunk(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                self.compute_s["forward"] += time.perf_counter() - start

        def backward_one_chunk(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                self.compute_s["backward"] += time.perf_counter() - start

    return TimedStage


class Pipeline:
    """This rank's stages under the spec's schedule (collective over the dims' pp group)."""

    def __init__(self, stages: list[StageModule], dims: ParallelDims, spec: JobSpec, device: torch.device) -> None:
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        pipe = spec.parallel.pipeline
        total = dims.pp * pipe.virtual_stages
        group = dims.group("pp")
        self.microbatches = pipe.microbatches
        self.batch_size = spec.training.batch_size
        stage_class = timed_stage_class()
        self.stages = [stage_class(m, m.index, total, device, group=group) for m in stages]
        self.is_last = any(m.index == total - 1 for m in stages)
        self._scale = 1.0
        if pipe.schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.stages, self.microbatches, self._loss, scale_grads=False)
        else:
            kind = Schedule1F1B if pipe.schedule == "1f1b" else ScheduleGPipe
            self.schedule = kind(self.stages[0], self.microbatches, self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce * self._scale

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward and backward of one batch, split into micro-batches, gradients accumulated into the
        parameters (weighted `scale` / microbatches each; MoE aux losses alike). Returns the batch's mean
        cross-entropy on the last stage's rank, zero on the others."""
        self._scale = scale / self.microbatches
        losses: list[torch.Tensor] = []
        with moe_scope(weight=self._scale):
            self.schedule.step(inputs, target=targets, losses=losses)
        if not self.is_last:
            return torch.zeros(())
        return torch.stack([loss.detach().float() for loss in losses]).sum() / scale

    def take_compute_seconds(self) -> dict[str, float]:
        """Forward and backward compute of this rank's stages since the last call; resets."""
        out = {"forward": 0.0, "backward": 0.0}
        for stage in self.stages:
            for part in out:
                out[part] += stage.compute_s[part]
                stage.compute_s[part] = 0.0
        return out

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Logits of a batch (the last stage's rank; None elsewhere; the schedule also computes the
        loss, so it takes the targets). A batch smaller than the training batch is padded to it (the
        stages' buffers are sized for its micro-batches) and cut back."""
        rows = inputs.shape[0]
        if rows < self.batch_size:
            inputs = torch.cat([inputs, inputs[:1].expand(self.batch_size - rows, -1)])
            targets = torch.cat([targets, targets[:1].expand(self.batch_size - rows, -1)])
        out = self.schedule.eval(inputs, target=targets)
        return out[:rows] if self.is_last else None
