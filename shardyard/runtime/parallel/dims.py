"""The job's parallel degrees and its one device mesh (modelled on torchtitan's ParallelDims).

`ParallelDims` validates the degrees against the world and, in `build()`, makes ONE 1-D world
mesh; every group a job needs is a named view unflattened from it. pp is the outermost dim: the
ranks of one pipeline stage are a contiguous block of world / pp ranks, and every view below lives
inside one stage's block (its groups hold the ranks of the same stage). tp is the innermost: the
ranks of one tensor-parallel group are neighbours (one node) and read the same batch:

    pp      (pp, dp, tp)                 the pipeline (one rank per stage, same dp and tp coordinate)
                                         and the data-parallel ranks (each reads its own batches)
    tp      (pp, dp_replicate, dp_shard, tp)  tensor (and sequence) parallelism (tensor_parallel.py)
    dense   (dp_replicate, dp_shard)     DDP / explicit all-reduce over dp_replicate, FSDP2 over
                                         dp_shard; both together are the data-parallel ranks
    experts (edp, ep)                    EP groups are contiguous blocks of `ep` ranks (as few nodes
                                         as possible), EDP the ranks holding the same expert shard
    nodes   ep -> (ep_node, ep_local)    the EP group seen node by node (ranks are node-major): the
                                         intra-node and inter-node ("rail") groups of the
                                         hierarchical and leader transports and of node dedup

The data loader and every data-parallel reduction read `dp_rank` / `dp`. Expert-parallel groups are
contiguous blocks of `ep` ranks of a stage, which may span tensor-parallel ranks (they hold distinct
tokens too). Everything that needs a group asks this object: `mesh(name)`, `group(name)` and `expert_groups`
(the EP view comm/ transports take). A world of one is a mesh of one: `build()` starts a one-rank
process group when none exists, so no caller branches on `dist.is_initialized()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shardyard.comm.groups import ProcessGroups, ep_layout, largest_expert_parallel
from shardyard.comm.topology import Topology
from shardyard.platform.schema import ParallelSpec


def ensure_process_group(device_type: str = "cpu") -> None:
    """A world of one still gets a process group (one rank, in-memory store), so the mesh and the
    collectives over it are the same code at any world size."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@dataclass
class ParallelDims:
    topology: Topology
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    tp: int = 1
    pp: int = 1
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    _expert_groups: ProcessGroups | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        world = self.topology.world_size
        for name in ("dp_replicate", "dp_shard", "ep", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")
        if self.dp_replicate * self.dp_shard * self.tp * self.pp != world:
            raise ValueError(
                f"dp_replicate ({self.dp_replicate}) x dp_shard ({self.dp_shard}) x tp ({self.tp}) x pp "
                f"({self.pp}) must equal the world size ({world})"
            )
        ep_layout(self.topology, self.ep)  # ep divides the ranks, and nodes (ValueError)
        if (self.dp * self.tp) % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide the ranks of a stage ({self.dp * self.tp})")

    # ------------------------------------------------------------------------------ from the spec
    @classmethod
    def from_spec(cls, parallel: ParallelSpec, topology: Topology, num_experts: int = 1) -> ParallelDims:
        """Dense weights sharded over every rank with `parallel.shard` (zero2 / full), else replicated;
        experts over `parallel.expert_parallel` ranks (`auto`: the largest degree dividing this world
        and `num_experts`, re-derived at every start of an elastic group), stages over
        `parallel.pipeline_parallel`, tensor-parallel groups of `parallel.tensor_parallel` ranks.
        Data-parallel ranks = world / (pp x tp); a data-parallel degree of one shards nothing."""
        pp, tp = parallel.pipeline_parallel, parallel.tensor_parallel
        dp = topology.world_size // (pp * tp)
        shard = parallel.shard != "none" and dp > 1
        ep = parallel.expert_parallel
        return cls(
            topology,
            dp_replicate=1 if shard else dp,
            dp_shard=dp if shard else 1,
            ep=largest_expert_parallel(topology, num_experts) if ep == "auto" else ep,
            tp=tp,
            pp=pp,
        )

    # ------------------------------------------------------------------------------ degrees
    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each reads its own batches)."""
        return self.dp_replicate * self.dp_shard

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def pp_rank(self) -> int:
        """This rank's place in its pipeline (stage blocks are contiguous: pp is the outermost dim)."""
        return self.rank // (self.dp * self.tp)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate (which batches it reads; shared by its pipeline and by
        its tensor-parallel group: tp is the innermost dim)."""
        return (self.rank // self.tp) % self.dp

    @property
    def tp_rank(self) -> int:
        """This rank's place in its tensor-parallel group (tp is the innermost dim)."""
        return self.rank % self.tp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ranks_per_node_in_ep(self) -> int:
        return min(self.topology.ranks_per_node, self.ep)

    # ------------------------------------------------------------------------------ the mesh
    def build(self, device_type: str = "cpu") -> ParallelDims:
        """Create the world mesh and its views (collective: every rank calls it, once). Returns self."""
        if self._meshes:
            return self
        ensure_process_group(device_type)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"topology (rank {self.rank}/{self.world_size}) disagrees with torch.distributed "
                f"({dist.get_rank()}/{dist.get_world_size()})"
            )
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        pipeline = world._unflatten(0, (self.pp, self.dp, self.tp), ("pp", "dp", "tp"))
        dense = world._unflatten(
            0, (self.pp, self.dp_replicate, self.dp_shard, self.tp), ("pp", "dp_replicate", "dp_shard", "tp")
        )  # FSDP2 over dp_shard and TP over tp: views of one mesh (the 2-D layout needs them so)
        experts = world._unflatten(0, (self.pp, self.dp * self.tp // self.ep, self.ep), ("pp", "edp", "ep"))
        per_node = self.ranks_per_node_in_ep
        nodes = experts._unflatten("ep", (self.ep // per_node, per_node), ("ep_node", "ep_local"))
        self._meshes = {
            "world": world,
            "pp": pipeline["pp"],
            "dp": pipeline["dp"],
            "pp_dp": pipeline["pp", "dp"]._flatten("pp_dp"),
            "dense": dense["dp_replicate", "dp_shard"],
            "dp_replicate": dense["dp_replicate"],
            "dp_shard": dense["dp_shard"],
            "tp": dense["tp"],
            "experts": experts["edp", "ep"],
            "edp": experts["edp"],
            "ep": experts["ep"],
            "ep_node": nodes["ep_node"],
            "ep_local": nodes["ep_local"],
        }
        self._expert_groups = self._make_expert_groups()
        return self

    def mesh(self, name: str) -> DeviceMesh:
        """A named view: world, pp, dp (dp_replicate x dp_shard flattened), pp_dp (pp x dp flattened:
        one rank of every tensor-parallel group; the world at tp 1), dense (dp_replicate x
        dp_shard), dp_replicate, dp_shard, tp, experts (edp x ep), edp, ep, ep_node, ep_local."""
        if not self._meshes:
            raise RuntimeError("ParallelDims.build() has not run")
        return self._meshes[name]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.mesh(name).get_group()

    def ranks(self, name: str) -> list[int]:
        """The global ranks of this rank's group along the 1-D view `name`."""
        return dist.get_process_group_ranks(self.group(name))

    @property
    def expert_groups(self) -> ProcessGroups:
        """The EP view the token dispatcher's transports take (groups of the one mesh)."""
        if self._expert_groups is None:
            raise RuntimeError("ParallelDims.build() has not run")
        return self._expert_groups

    def _make_expert_groups(self) -> ProcessGroups:
        groups = ProcessGroups(
            self.topology,
            self.ep,
            self.ranks("ep"),
            self.group("ep"),
            self.ranks("edp"),
            self.group("edp"),
            self.ranks("ep_local"),
            self.group("ep_local"),
            self.ranks("ep_node"),
            self.group("ep_node"),
        )
        layout = ep_layout(self.topology, self.ep)  # the node-aware layout the transports rely on
        stage = {r for r in range(self.world_size) if r // (self.dp * self.tp) == self.pp_rank}
        # EDP groups stop at the stage's block of ranks
        layout["edp"] = [[r for r in g if r in stage] for g in layout["edp"]]
        for kind, mine in (
            ("ep", groups.ep_ranks),
            ("edp", groups.edp_ranks),
            ("intra", groups.intra_ranks),
            ("inter", groups.inter_ranks),
        ):
            assert mine in layout[kind], (kind, mine, layout[kind])
        return groups


def replicated_dims(topology: Topology, ep: int, device_type: str = "cpu") -> ParallelDims:
    """Replicated dense weights and `ep`-way experts, built (what comm tests and benchmarks run on)."""
    return ParallelDims(topology, dp_replicate=topology.world_size, ep=ep).build(device_type)
