"""Gradient reduction for the parameters no wrapper (DDP, FSDP2) reduces.

We reduce explicitly rather than through DDP where expert shards are involved, so that one function
handles both kinds of parameters with gloo and NCCL alike:
- dense parameters (replicated everywhere): all-reduce over the data-parallel world, divided by W;
- expert parameters: an expert's local gradient already sums the contributions of every token of
  its EP group (the all-to-all backward brings them home), so it is summed over the EDP group (the
  ranks holding the same shard) and divided by W as well. That is the gradient of the world-mean
  loss, identical to a single worker holding all experts and averaging over all W batches.
  (Dividing by the EDP size instead, a common slip, gives ep times too large expert gradients.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from shardyard.comm.groups import ProcessGroups
from shardyard.models.moe.experts import is_expert_shard


def all_reduce_mean_(params: list[nn.Parameter], group: dist.ProcessGroup | None, world: int) -> None:
    """Sum the gradients of `params` over `group` and divide by `world`: one all-reduce per dtype
    over the concatenated gradients (a DTensor's local shard: its tensor-parallel peers reduce theirs
    alike). A parameter without a gradient gets a zero one, so every rank reduces the same buffers."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def sync_gradients(
    model: nn.Module,
    groups: ProcessGroups,
    dense_group: dist.ProcessGroup | None = None,
    dense: bool = True,
    replicas: int | None = None,
) -> None:
    """Average gradients to those of the world-mean loss: dense over `dense_group` (default: the
    world; `dense=False` when FSDP2 reduces them), experts over EDP. `replicas`: the data-parallel
    ranks whose losses are averaged (default: the world; fewer when a pipeline's or a tensor-parallel group's ranks share a batch).

    Call after backward, before clipping and the optimizer step; collective over the world."""
    world = replicas or groups.topology.world_size
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if dense:
        all_reduce_mean_([p for p in params if not is_expert_shard(p)], dense_group, world)
    if groups.ep_size > 1:
        all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.edp, world)
