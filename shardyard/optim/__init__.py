"""Optimizers and learning-rate schedules built from `spec.optim`.

`build_optimizer(spec.optim, model)` returns a plain torch.optim.Optimizer (state_dict-compatible, so
the checkpoint code saves every kind the same way): torch AdamW, torch SGD, GaLoreAdamW (galore.py)
or QGaLoreAdamW (qgalore.py); `build_scheduler` the warm-up + decay schedule;
`optimizer_memory_report` (memory.py) the parameter / gradient / state bytes of a spec's optimizer.

Wiring, in this order:
1. `model = prepare_model_for_optimizer(model, spec.optim)` right after the model is built (and
   expert parallelism applied): for q_galore_adamw it swaps projected weights for INT8 layers
   (int8_weights.py); for other kinds it returns the model unchanged.
2. `optimizer = build_optimizer(spec.optim, model, group)` (group: the data-parallel ranks).
3. With `optim.galore.layerwise` (any world size), or q_galore_adamw with more than one worker
   (DDP cannot wrap INT8 layers): `LayerwiseStepper` (layerwise.py) instead of DDP. It reduces
   gradients in buckets from their hooks; layer-wise it steps each parameter as its bucket lands,
   otherwise it clips globally and steps once in `finish()`, which returns the global grad norm and
   runs the optimizer's step hooks in both modes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from shardyard.optim.int8_weights import prepare_model_for_optimizer
from shardyard.platform.schema import OptimSpec, ScheduleSpec

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier", "param_groups", "prepare_model_for_optimizer"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and stacked expert weights); leave norms, biases and embeddings undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # torch's per-group flags that pick the kernel


def kernel_options(implementation: str, model: nn.Module) -> dict[str, bool]:
    """optim.implementation as torch's flags. Two cases take the for-loop, with the same maths and state:
    parameters on the meta device (validate's memory prediction steps a meta model; no fused kernel
    there), and a model mixing DTensors with plain tensors (expert shards beside FSDP's or tensor
    parallelism's DTensors): torch's fused and foreach kernels take one kind of tensor per call."""
    params = list(model.parameters())
    dtensors = sum(isinstance(p, DTensor) for p in params)
    if any(p.device.type == "meta" for p in params) or 0 < dtensors < len(params):
        return {"foreach": False}
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def build_optimizer(spec: OptimSpec, model: nn.Module, group: dist.ProcessGroup | None = None) -> torch.optim.Optimizer:
    """`group`: the data-parallel ranks GaLore shares its projection over (None: one process alone)."""
    if spec.kind in ("adamw", "sgd"):
        groups, kernels = param_groups(model, spec.weight_decay), kernel_options(spec.implementation, model)
        if spec.kind == "adamw":
            return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, **kernels)
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, **kernels)
    if spec.kind in ("galore_adamw", "q_galore_adamw"):
        from shardyard.optim.galore import GaLoreAdamW, galore_param_groups
        from shardyard.optim.qgalore import QGaLoreAdamW

        g = spec.galore
        assert g is not None  # filled by OptimSpec's validator
        groups = galore_param_groups(model, g.targets, g.rank, spec.weight_decay, g.experts)
        common = dict(
            lr=spec.lr,
            betas=spec.betas,
            eps=spec.eps,
            rank=g.rank,
            update_gap=g.update_gap,
            scale=g.scale,
            projection=g.projection,
            oversample=g.oversample,
            power_iters=g.power_iters,
            seed=g.seed,
            broadcast_projection=g.broadcast_projection,
            layerwise=g.layerwise,
            moments=g.moments,
            layerwise_clip=spec.grad_clip if g.layerwise else 0.0,
            group=group,
        )
        if spec.kind == "galore_adamw":
            return GaLoreAdamW(groups, **common)
        q = g.quant
        assert q is not None
        return QGaLoreAdamW(
            groups,
            proj_group_size=q.proj_group_size,
            weight_group_size=q.weight_group_size,
            stochastic_rounding=q.stochastic_rounding,
            sim_threshold=q.sim_threshold,
            sim_streak=q.sim_streak,
            gap_growth=q.gap_growth,
            max_update_gap=q.max_update_gap,
            **common,
        )
    raise ValueError(f"unknown optimizer {spec.kind!r}")


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleSpec) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine/linear/constant decay."""
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    if schedule.decay == "constant" or total_steps <= schedule.warmup:
        return 1.0
    progress = min(1.0, (step - schedule.warmup) / max(1, total_steps - schedule.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape


def build_scheduler(
    spec: OptimSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, spec.schedule))
