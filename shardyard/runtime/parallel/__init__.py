"""One parallelism plan per job, chosen from `spec.parallel` (see base.ParallelPlan)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardyard.optim import build_optimizer, build_scheduler
from shardyard.optim.int8_weights import prepare_model_for_optimizer
from shardyard.platform.schema import JobSpec
from shardyard.runtime.parallel.base import ParallelPlan


def build_plan(spec: JobSpec, model: nn.Module, device: torch.device) -> ParallelPlan:
    """Wrap / shard `model` for this job and build its optimizer and scheduler (collective)."""
    par = spec.parallel
    world = dist.get_world_size() if dist.is_initialized() else 1

    def optimizer_for(m: nn.Module) -> torch.optim.Optimizer:
        prepare_model_for_optimizer(m, spec.optim)  # Q-GaLore: INT8 weights replace the fp32 ones
        return build_optimizer(spec.optim, m)

    def scheduler_for(opt: torch.optim.Optimizer):
        return build_scheduler(spec.optim, opt, spec.training.steps)

    if par.zero:
        from shardyard.runtime.parallel.deepspeed_zero import DeepSpeedPlan

        optimizer = optimizer_for(model)
        return DeepSpeedPlan(spec, model, optimizer, scheduler_for(optimizer))
    galore = spec.optim.galore
    # Layer-wise GaLore (any world: it also carries gradient accumulation) and multi-worker Q-GaLore
    # (INT8 weights DDP cannot wrap) reduce gradients from their hooks.
    hook_reduced = galore is not None and (galore.layerwise or (spec.optim.kind == "q_galore_adamw" and world > 1))
    if par.expert_parallel > 1 or (par.shard != "none" and world > 1) or hook_reduced:
        from shardyard.comm.groups import build_groups
        from shardyard.comm.topology import topology_from_ray
        from shardyard.runtime.parallel.mesh import HookReducedPlan, MeshPlan

        groups = build_groups(topology_from_ray(), par.expert_parallel) if par.expert_parallel > 1 else None
        if hook_reduced:
            return HookReducedPlan(
                model,
                optimizer_for,
                scheduler_for,
                spec.optim.grad_clip,
                groups=groups,
                ep=par.expert_parallel,
                a2a=par,
                device=device,
            )
        return MeshPlan(
            model,
            optimizer_for,
            scheduler_for,
            spec.optim.grad_clip,
            groups=groups,
            ep=par.expert_parallel,
            shard=par.shard,
            a2a=par,
            device=device,
        )
    from shardyard.comm.expert_parallel import apply_expert_parallel
    from shardyard.runtime.parallel.replicated import ReplicatedPlan

    apply_expert_parallel(model, None, par)  # EP 1: parallel.dispatch stages, if any, with a local transport

    optimizer = optimizer_for(model)
    return ReplicatedPlan(model, optimizer, scheduler_for(optimizer), spec.optim.grad_clip, device)
