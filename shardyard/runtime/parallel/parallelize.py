"""Parallelism applied to a built model from outside, one function per model family.

`parallelize(model, dims, spec)` reads top to bottom (as torchtitan's parallelize functions do):

0. pipeline split (pp > 1): the model pruned to this rank's stages (pipeline.split_into_stages);
1. expert placement: every MoE layer keeps its E/ep slice of the experts (in place) and gets the
   token dispatcher the spec asks for (comm.token_dispatch: transport + dedup / LSH / codec stages;
   the layer's local dispatcher at EP 1 without stages);
2. tensor parallelism with sequence parallelism over the dims' tp mesh (tensor_parallel.py: heads
   and dense MLPs split, norms and the residual stream split along the sequence, MoE tokens split);
3. activation checkpointing (training.activation_checkpointing) on every transformer stack;
4. compile (training.compile): torch.compile on every transformer block, in place (names unchanged),
   and on the flat model's output (final norm, head, loss);
5. FSDP2 over the dims' dp_shard mesh (each block, then the root -- each stage is a root under pp;
   expert shards stay outside it when ep > 1; with tp, a 2-D layout: FSDP shards the tp shards), or
   DDP over the data-parallel ranks when dense weights are replicated and nothing else reduces
   gradients, or nothing (a world of one).

It returns the module the forward is called on (the model itself, or its DDP wrapper), or under
pipeline parallelism the rank's stages (an nn.ModuleList the pipeline schedule runs). It only
places and shards: the optimizer, the scheduler and the gradient step are built beside it
(runtime.parallel.build_training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardyard.comm.groups import ProcessGroups
from shardyard.comm.token_dispatch import build_token_dispatcher
from shardyard.models.moe.experts import EXPERT_SHARD_ATTR, is_expert_shard
from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.router import ExpertChoiceRouter
from shardyard.models.transformer import Block, ByteTransformerLM, TransformerStack
from shardyard.platform.schema import JobSpec, ParallelSpec, TrainingSpec
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.pipeline import StageModule, split_into_stages
from shardyard.runtime.parallel.tensor_parallel import apply_tp, head_aligned


# ------------------------------------------------------------------------------ expert placement
def keep_expert_slice_(experts: nn.Module, lo: int, hi: int) -> None:
    """Keep experts [lo, hi) of a stacked [E, ...] experts module, in place; the kept parameters are
    marked as expert shards (models.moe.experts.is_expert_shard)."""
    for name, p in list(experts.named_parameters(recurse=False)):
        shard = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
        setattr(shard, EXPERT_SHARD_ATTR, True)
        experts._parameters[name] = shard
    experts.num_experts = hi - lo
    experts.first_expert = lo  # where the slice starts in the full stack (readers of whole checkpoints)


def place_experts(model: nn.Module, groups: ProcessGroups | None, parallel: ParallelSpec) -> nn.Module:
    """Expert placement for every MoE layer of `model` (in place; returns it): with an EP group of
    more than one rank its experts shrink to this rank's slice; every layer gets the dispatcher
    `parallel` asks for (a2a transport and dispatch stages). All ranks must hold the same full
    weights beforehand (same seed, or a broadcast)."""
    ep = groups.ep_size if groups is not None else 1
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
        if layer.num_experts % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide num_experts ({layer.num_experts})")
        width = layer.experts.w_up.shape[1]
        slots = layer.num_experts if isinstance(layer.router, ExpertChoiceRouter) else layer.top_k
        layer.dispatcher = build_token_dispatcher(
            layer.num_experts, width, groups, parallel.dispatch, parallel.a2a, layer=index, slots=slots
        )
        if ep > 1:
            per_rank = layer.num_experts // ep
            lo = groups.ep_rank * per_rank
            keep_expert_slice_(layer.experts, lo, lo + per_rank)
    return model


# ------------------------------------------------------------------------------ the other steps
def apply_activation_checkpointing(model: nn.Module, training: TrainingSpec) -> None:
    """training.activation_checkpointing: every (n-th) block of every stack (or pipeline stage, counting
    blocks by their index in the whole stack) recomputed in backward."""
    mode = training.activation_checkpointing
    if mode == "none":
        return
    every = 1 if mode == "full" else training.activation_checkpointing_every
    for module in model.modules():
        if isinstance(module, (TransformerStack, StageModule)):
            module.checkpoint_every = every


def apply_compile(roots: list[nn.Module], training: TrainingSpec) -> None:
    """training.compile: torch.compile every transformer block in place (`Module.compile`, so parameter
    names and checkpoints are unchanged), and a flat model's output (final norm, head and loss: eager,
    they were most of the gap to a whole-model compile). Blocks compile one by one, as torchtitan does: identical blocks
    share one compiled graph, and activation checkpointing (outside the block, in TransformerStack) and
    FSDP / DDP (applied next, hooks outside the compiled region) compose with it. Dense blocks and MoE
    blocks with the local dispatcher are one graph each; a transport dispatcher (expert parallelism,
    compressed dispatch) runs eagerly between two graphs (docs/parallelism.md)."""
    if not training.compile:
        return
    modules = {id(m): m for root in roots for m in root.modules()}.values()
    for module in modules:
        if getattr(module, "eager_under_compile", False):
            module.forward = torch.compiler.disable(module.forward)
    for block in (m for m in modules if isinstance(m, Block)):
        block.compile()
    for model in (m for m in modules if isinstance(m, ByteTransformerLM)):
        model.output = torch.compile(model.output)  # final norm, head and loss: one more graph


def apply_fsdp(roots: list[nn.Module], dims: ParallelDims, reshard_after_forward: bool) -> None:
    """FSDP2 over dp_shard (HSDP over (dp_replicate, dp_shard) when both exceed one; no spec asks for
    that yet): each transformer block, then each root (the model, or every pipeline stage). Expert
    shards are left out (their gradients are reduced over EDP); with ep == 1 FSDP shards the expert
    stacks too (dim 0)."""
    from torch.distributed.fsdp import fully_shard

    mesh = dims.mesh("dense") if dims.dp_replicate > 1 else dims.mesh("dp_shard")  # 2-D: HSDP
    ignored = {p for root in roots for p in root.parameters() if is_expert_shard(p)}
    for module in [m for root in roots for m in root.modules() if isinstance(m, Block)]:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    for root in roots:
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)


def apply_ddp(model: nn.Module, dims: ParallelDims, device: torch.device) -> nn.Module:
    # No buffer sync in forward: MoE layers accumulate per-rank counts in buffers; the persistent
    # ones (router biases) are kept identical by construction (the one sync at init is harmless).
    return DistributedDataParallel(
        model,
        device_ids=None if device.type == "cpu" else [device],
        forward_sync_buffers=False,
        process_group=dims.group("dp_replicate"),
    )


def uses_ddp(dims: ParallelDims, own_reduction: bool) -> bool:
    """DDP reduces dense gradients when they are replicated over several ranks and nothing else
    (expert-parallel reduction, tensor parallelism's DTensors, a hook-reduced stepper, an engine:
    `own_reduction`; under pipeline parallelism the gradient step's explicit reduction) does."""
    return (
        dims.dp_replicate > 1
        and not dims.ep_enabled
        and not dims.tp_enabled
        and not dims.pp_enabled
        and not own_reduction
    )


def parallelize_transformer(
    model: nn.Module, dims: ParallelDims, spec: JobSpec, device: torch.device, own_reduction: bool = False
) -> nn.Module:
    """The flat transformers (dense | moe) and the byte models (their stacks are transformer stacks)."""
    stages = split_into_stages(model, dims, spec.parallel.pipeline) if dims.pp_enabled else []
    place_experts(model, dims.expert_groups if dims.ep_enabled else None, spec.parallel)
    if dims.tp_enabled:
        apply_tp(model, dims.mesh("tp"), head_aligned(spec.model, dims.tp))
    for root in [model, *stages]:
        apply_activation_checkpointing(root, spec.training)
    apply_compile([model, *stages], spec.training)
    if dims.fsdp_enabled:
        apply_fsdp(stages or [model], dims, reshard_after_forward=spec.parallel.shard == "full")
    if stages:
        return nn.ModuleList(stages)
    if dims.fsdp_enabled:
        return model
    if uses_ddp(dims, own_reduction):
        return apply_ddp(model, dims, device)
    return model


Parallelize = Callable[..., nn.Module]
PARALLELIZE: dict[str, Parallelize] = {
    "dense": parallelize_transformer,
    "moe": parallelize_transformer,
    "megabyte": parallelize_transformer,
    "multiscale": parallelize_transformer,
}


def parallelize(
    model: nn.Module, dims: ParallelDims, spec: JobSpec, device: torch.device, own_reduction: bool = False
) -> nn.Module:
    """The model family's parallelize function (see the module docstring); a kind not listed is a
    transformer family (every model here is built from transformer stacks)."""
    return PARALLELIZE.get(spec.model.kind, parallelize_transformer)(model, dims, spec, device, own_reduction)
