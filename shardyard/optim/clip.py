"""The one gradient-norm clip: the norm of the whole (unsharded) model's gradient, exact over every
mesh dimension, identical on every rank.

Each gradient is counted where it lives:
- a DTensor (an FSDP2 shard, a tensor-parallel shard, both): the squares of its local shard, summed
  over the ranks each mesh dim shards it across (each holds a disjoint piece);
- an expert-parallel shard (models.moe.experts.is_expert_shard): summed over the EP group, whose ranks
  hold disjoint experts (their EDP peers hold the same, already reduced, values);
- a plain tensor: replicated (already reduced), counted once;
- and under pipeline parallelism the whole sum over the stage group: stages hold disjoint parameters.
Each tensor's norm is taken where it lives, in float32 (torch's foreach kernel: one pass over every
gradient), and their squares are summed in float64 on the CPU.
Gradients are then scaled by max_norm / (norm + 1e-6) when that is below one (the rule of
torch.nn.utils.clip_grad_norm_).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

from shardyard.models.moe.experts import is_expert_shard


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def local_square_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares (float64, on CPU) of the given gradients' LOCAL elements (a DTensor's shard):
    each tensor's norm accumulated in float32 where it lives by one foreach call (a float64 norm per
    tensor converted every element and cost 5-10x torch's whole clip), one transfer to the CPU for
    all of them, their squares summed there in float64."""
    local = [_local(g).detach() for g in grads]
    if not local:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(local, 2, dtype=torch.float32)
    return torch.stack(norms).cpu().double().square().sum()


def _sum_over(value: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    value = value.to(device)
    dist.all_reduce(value, group=group)
    return value.cpu()


def _splits(placement: Placement) -> bool:
    """Whether a placement splits the tensor over its mesh dim: Shard, and FSDP2's strided shard of a
    tensor-parallel shard (which is not a Shard subclass)."""
    return not placement.is_replicate() and not placement.is_partial()


def _shard_groups(g: DTensor) -> list[dist.ProcessGroup]:
    mesh = g.device_mesh
    return [mesh.get_group(i) for i, p in enumerate(g.placements) if _splits(p) and mesh.size(i) > 1]


@torch.no_grad()
def grad_norm(
    params: Iterable[nn.Parameter],
    expert_group: dist.ProcessGroup | None = None,
    stage_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The global gradient norm (float32 scalar on CPU); collective over the groups involved."""
    params = [p for p in params if p.grad is not None]
    device = params[0].device if params else torch.device("cpu")
    sharded: dict[tuple, list[torch.Tensor]] = {}
    replicated, experts = [], []
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and _shard_groups(g):
            sharded.setdefault(tuple(_shard_groups(g)), []).append(g)
        elif is_expert_shard(p):
            experts.append(g)
        else:
            replicated.append(g)
    total = local_square_norm(replicated)
    for groups, grads in sharded.items():
        sq = local_square_norm(grads)
        for group in groups:
            sq = _sum_over(sq, group, device)
        total = total + sq
    expert_sq = local_square_norm(experts)
    if expert_group is not None and dist.get_world_size(expert_group) > 1:
        expert_sq = _sum_over(expert_sq, expert_group, device)
    total = total + expert_sq
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        total = _sum_over(total, stage_group, device)
    return total.sqrt().float()


@torch.no_grad()
def scale_grads_(params: Iterable[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_([_local(p.grad) for p in params if p.grad is not None], coef)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[nn.Parameter],
    max_norm: float,
    expert_group: dist.ProcessGroup | None = None,
    stage_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip the gradients of `params` by their global norm (`max_norm` <= 0: no clipping); returns the
    norm before clipping. Collective: every rank calls it with its own parameters."""
    params = list(params)
    norm = grad_norm(params, expert_group, stage_group)
    if max_norm > 0:
        scale_grads_(params, norm, max_norm)
    return norm
