"""Expert parallelism: each rank of an EP group keeps E/ep experts; tokens travel to them and back.

`ExpertParallelExperts` is a drop-in for `GroupedExperts` (same forward signature and result): rows
grouped by GLOBAL expert with offsets over all E experts in, expert outputs in the same order out.
Inside: per-expert counts are exchanged, rows are dispatched to the rank owning their expert, the
rank runs one grouped GEMM over its experts, and the outputs are combined back.

EP rank r of an EP group owns global experts [r*E/ep, (r+1)*E/ep). Its `local` module is a
`GroupedExperts` holding exactly that slice of the full weights (parameters `local.w_up`, ...).

Gradients (`sync_gradients`): we reduce explicitly rather than through DDP, so that one function
handles both kinds of parameters with gloo and NCCL alike:
- dense parameters (replicated everywhere): all-reduce over the data-parallel world, divided by W;
- expert parameters: an expert's local gradient already sums the contributions of every token of
  its EP group (the all-to-all backward brings them home), so it is summed over the EDP group (the
  ranks holding the same shard) and divided by W as well. That is the gradient of the world-mean
  loss, identical to a single worker holding all experts and averaging over all W batches.
  (Dividing by the EDP size instead, a common slip, gives ep times too large expert gradients.)
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from shardyard.comm.alltoall import AllToAll, build_all_to_all, run_route, transpose_index
from shardyard.comm.groups import ProcessGroups
from shardyard.models.moe.experts import EXPERT_SHARD_ATTR, GroupedExperts, is_expert_shard
from shardyard.models.moe.layer import MoELayer



class ExpertParallelExperts(nn.Module):
    def __init__(self, experts: GroupedExperts, groups: ProcessGroups, a2a: str | AllToAll = "flat") -> None:
        super().__init__()
        num_experts, ep = experts.num_experts, groups.ep_size
        if num_experts % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide num_experts ({num_experts})")
        self.num_experts = num_experts
        self.ep_size = ep
        self.experts_per_rank = num_experts // ep
        self.first_expert = groups.ep_rank * self.experts_per_rank
        self.a2a = a2a if isinstance(a2a, AllToAll) else build_all_to_all(a2a, groups)
        lo, hi = self.first_expert, self.first_expert + self.experts_per_rank
        # Copy the module (config, hooks, buffers) without copying its full weights, then give it
        # this rank's slice of every parameter (all are stacked [E, ...] by expert).
        full = dict(experts.named_parameters(recurse=False))
        local = copy.deepcopy(experts, memo={id(p): None for p in full.values()})
        for name, p in full.items():
            shard = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
            setattr(shard, EXPERT_SHARD_ATTR, True)
            local._parameters[name] = shard
        local.num_experts = self.experts_per_rank
        self.local = local

    @property
    def backend(self) -> str:  # MoELayer.backend reads / sets its experts' backend
        return self.local.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.local.backend = name

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [M, width] grouped by global expert; offsets: [E] int32 cumulative row ends."""
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # on x's device (NCCL needs that)
        route = self.a2a.plan(counts.view(self.ep_size, self.experts_per_rank))
        recv = route.recv_counts  # [source EP rank, local expert]
        y = run_route(x_sorted, route)  # rows (source, local expert)
        # group by local expert for one grouped GEMM: (source, expert) -> (expert, source)
        sizes = recv.cpu().numpy()
        y = y.index_select(0, transpose_index(sizes).to(y.device))
        local_offsets = torch.cumsum(recv.sum(0), 0).to(device=x_sorted.device, dtype=torch.int32)
        out = self.local(y, local_offsets)
        out = out.index_select(0, transpose_index(sizes.T.copy()).to(out.device))
        return run_route(out, route.reverse())

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.experts_per_rank - 1} of "
                f"{self.num_experts}, ep={self.ep_size}, a2a={self.a2a.name}")


def apply_expert_parallel(model: nn.Module, groups: ProcessGroups, a2a: str = "flat") -> nn.Module:
    """Swap every MoELayer's `.experts` for an ExpertParallelExperts keeping this rank's slice.

    All ranks must hold the same full weights beforehand (same seed, or a broadcast). In place;
    returns the model. With ep_size 1 the model is left as is.
    """
    if groups.ep_size == 1:
        return model
    algo = build_all_to_all(a2a, groups)
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.experts, GroupedExperts):
            module.experts = ExpertParallelExperts(module.experts, groups, algo)
    return model


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup | None, scale: float) -> None:
    """One all-reduce per dtype over the concatenated gradients, scaled, copied back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for bucket in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ProcessGroups) -> None:
    """Average gradients to those of the world-mean loss: dense over the world, experts over EDP.

    Call after backward, before clipping and the optimizer step; collective over the world. A
    parameter without a gradient gets a zero one, so every rank reduces the same buffers.
    """
    world = groups.topology.world_size
    if world == 1:
        return
    dense: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_shard(p) else dense).append(p.grad)
    _all_reduce_flat(dense, None, 1.0 / world)  # the default group: the whole world
    _all_reduce_flat(expert, groups.edp, 1.0 / world)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, groups: ProcessGroups) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) model's gradient; the same on every rank.

    After `sync_gradients` dense gradients are identical everywhere, while each rank of an EP group
    holds the gradients of different experts: their squared norms are summed over the EP group.
    Clipping by a local norm instead would scale the replicas differently and let them drift apart.
    """
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().square().sum().cpu()
        if is_expert_shard(p):
            expert_sq += sq
        else:
            dense_sq += sq
    if groups.ep_size > 1:
        expert_sq = expert_sq.to(grads[0].device if grads else "cpu")
        dist.all_reduce(expert_sq, group=groups.ep)
        expert_sq = expert_sq.cpu()
    total = (dense_sq + expert_sq).sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total.float()
