"""Optimizers and learning-rate schedules built from `spec.optim`.

`build_optimizer(spec.optim, model)` returns a plain torch.optim.Optimizer (state_dict-compatible, so
the checkpoint code saves every kind the same way); `build_scheduler` the warm-up + decay schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardyard.platform.schema import OptimSpec, ScheduleSpec


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and stacked expert weights); leave norms, biases and embeddings undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(spec: OptimSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.kind == "adamw":
        return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr,
                                 betas=spec.betas, eps=spec.eps)
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


def build_scheduler(spec: OptimSpec, optimizer: torch.optim.Optimizer, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, spec.schedule))
