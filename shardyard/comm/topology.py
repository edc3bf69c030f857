"""Where this worker sits: world size, global rank, node and local rank, ranks per node.

Ranks are laid out node-major (rank = node_rank * ranks_per_node + local_rank), which is what Ray
Train and torchrun produce (workers sorted by node). `from_env` checks that, so process-group
builders can derive every other rank's node from its number alone.

Tests fake several nodes on one machine with `ranks_per_node=` or the environment variable
SHARDYARD_FAKE_RANKS_PER_NODE: 4 ranks with 2 per node are then two "nodes".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shardyard import envvars


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    node_rank: int
    local_rank: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node:
            raise ValueError(
                f"ranks_per_node ({self.ranks_per_node}) must divide world_size "
                f"({self.world_size}); uneven nodes are not supported"
            )
        if self.rank != self.node_rank * self.ranks_per_node + self.local_rank:
            raise ValueError(
                f"rank {self.rank} is not node-major: node_rank {self.node_rank} x "
                f"{self.ranks_per_node} + local_rank {self.local_rank}"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @classmethod
    def from_rank(cls, rank: int, world_size: int, ranks_per_node: int) -> Topology:
        """A node-major topology (also how tests fake nodes on one machine)."""
        return cls(world_size, rank, rank // ranks_per_node, rank % ranks_per_node, ranks_per_node)

    @classmethod
    def from_env(cls, ranks_per_node: int | None = None) -> Topology:
        """Read RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK (Ray Train / torchrun).

        `ranks_per_node` (or SHARDYARD_FAKE_RANKS_PER_NODE) overrides the real layout: local and
        node ranks are then derived from RANK, so one machine can pose as several nodes.
        """
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        fake = ranks_per_node or (
            int(env[envvars.FAKE_RANKS_PER_NODE]) if env.get(envvars.FAKE_RANKS_PER_NODE) else None
        )
        if fake:
            return cls.from_rank(rank, world, fake)
        per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        local = int(env.get("LOCAL_RANK", str(rank % per_node)))
        node = int(env.get("NODE_RANK", str(rank // per_node)))
        return cls(world, rank, node, local, per_node)


def topology_from_node_ids(rank: int, node_ids: list[str]) -> Topology:
    """Topology from every rank's node identity (in rank order), e.g. Ray node ids.

    Node ranks follow the order in which nodes first appear; local ranks count a node's ranks in
    rank order. Raises ValueError when ranks are not node-major or nodes hold different counts.
    """
    order: dict[str, int] = {}
    for node in node_ids:
        order.setdefault(node, len(order))
    per_node = len(node_ids) // len(order)
    node_rank = order[node_ids[rank]]
    local_rank = node_ids[:rank].count(node_ids[rank])
    return Topology(len(node_ids), rank, node_rank, local_rank, per_node)


def topology_from_ray() -> Topology:
    """The topology of a Ray Train worker, nodes told apart by Ray node id (collective).

    Ray Train's own NODE_RANK groups workers by IP address, which merges several raylets on one
    machine (ray.cluster_utils.Cluster, containers sharing a host network); Ray's node id does not.
    Falls back to `from_env` outside Ray or when a fake ranks-per-node is set.
    """
    import torch.distributed as dist

    if os.environ.get(envvars.FAKE_RANKS_PER_NODE) or not (dist.is_available() and dist.is_initialized()):
        return Topology.from_env()
    import ray

    if not ray.is_initialized():  # not a Ray worker (a world of one in any process, tests, torchrun)
        return Topology.from_env()  # (asking Ray's runtime context here would start a local Ray instance)
    node_id = ray.get_runtime_context().get_node_id()
    node_ids: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(node_ids, node_id)
    return topology_from_node_ids(dist.get_rank(), node_ids)
