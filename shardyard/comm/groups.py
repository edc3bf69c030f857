"""The expert-parallel view of the process groups, and its node-aware rank layout.

Layout (ranks are node-major, see comm.topology):

- expert-parallel (EP) groups: contiguous blocks of `ep` ranks, [g*ep, (g+1)*ep). Each EP group
  holds one full copy of every MoE layer's experts, E/ep per rank. Contiguous blocks keep an EP
  group on as few nodes as possible.
- expert-data-parallel (EDP) groups: the ranks holding the same expert shard, {r : r % ep == i};
  expert gradients are reduced over them.
- intra-node group: the ranks of this EP group on this node.
- inter-node group: the ranks of this EP group with this local rank, one per node ("rails").
  With ep == world_size these are exactly "same local rank across nodes".

The groups themselves are views of the job's one device mesh (runtime.parallel.dims.ParallelDims
builds them and checks them against `ep_layout`); comm/ only receives them as a `ProcessGroups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from shardyard.comm.topology import Topology


@dataclass
class ProcessGroups:
    topology: Topology
    ep_size: int
    ep_ranks: list[int]
    ep: dist.ProcessGroup
    edp_ranks: list[int]
    edp: dist.ProcessGroup
    intra_ranks: list[int]  # this node's ranks within the EP group (by local rank)
    intra: dist.ProcessGroup
    inter_ranks: list[int]  # this local rank on every node of the EP group (by node)
    inter: dist.ProcessGroup

    @property
    def ep_rank(self) -> int:
        return self.ep_ranks.index(self.topology.rank)

    @property
    def nodes_per_ep(self) -> int:
        return len(self.inter_ranks)

    @property
    def ranks_per_node_in_ep(self) -> int:
        return len(self.intra_ranks)

    @property
    def hierarchical_ok(self) -> bool:
        """True when the EP group is whole nodes of equal size (2-D layout nodes x local)."""
        return self.nodes_per_ep * self.ranks_per_node_in_ep == self.ep_size


def ep_layout(topo: Topology, ep: int) -> dict[str, list[list[int]]]:
    """Every group's ranks, in the creation order all ranks follow (pure; no torch.distributed)."""
    world, rpn = topo.world_size, topo.ranks_per_node
    if ep < 1 or world % ep:
        raise ValueError(f"expert_parallel ({ep}) must divide world_size ({world})")
    if ep % rpn and rpn % ep:
        raise ValueError(f"expert_parallel ({ep}) and ranks_per_node ({rpn}) must divide one another")
    ep_groups = [list(range(g * ep, (g + 1) * ep)) for g in range(world // ep)]
    edp_groups = [list(range(i, world, ep)) for i in range(ep)]
    intra_groups: list[list[int]] = []
    inter_groups: list[list[int]] = []
    for block in ep_groups:
        per_node = min(rpn, ep)
        nodes = [block[n * per_node : (n + 1) * per_node] for n in range(ep // per_node)]
        intra_groups += nodes
        inter_groups += [[node[l] for node in nodes] for l in range(per_node)]
    return {"ep": ep_groups, "edp": edp_groups, "intra": intra_groups, "inter": inter_groups}


def largest_expert_parallel(topo: Topology, num_experts: int) -> int:
    """`parallel.expert_parallel: auto`: the largest EP degree that divides the world size and
    `num_experts` and that `ep_layout` accepts on these nodes (1 when nothing larger does)."""
    world, rpn = topo.world_size, topo.ranks_per_node
    for ep in range(min(world, num_experts), 1, -1):
        if world % ep == 0 and num_experts % ep == 0 and not (ep % rpn and rpn % ep):
            return ep
    return 1
