"""ParallelDims: degrees validated against the world, one mesh whose views are the groups the job uses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardyard.comm.groups import ep_layout
from shardyard.comm.launch import spawn
from shardyard.comm.topology import Topology
from shardyard.platform.schema import ParallelSpec
from shardyard.runtime.parallel.dims import ParallelDims


def test_degrees_are_validated_against_the_world() -> None:
    topo = Topology.from_rank(0, 8, 4)
    with pytest.raises(ValueError, match="must equal the world size"):
        ParallelDims(topo, dp_replicate=2, dp_shard=2)
    with pytest.raises(ValueError, match="must divide world_size"):
        ParallelDims(topo, dp_replicate=8, ep=3)
    with pytest.raises(ValueError, match="divide one another"):
        ParallelDims(Topology.from_rank(0, 12, 4), dp_replicate=12, ep=6)
    with pytest.raises(ValueError, match="divide the ranks of a stage"):
        ParallelDims(Topology.from_rank(0, 4, 4), dp_replicate=1, ep=2, pp=4)
    with pytest.raises(ValueError, match=">= 1"):
        ParallelDims(topo, dp_replicate=8, ep=0)


def test_degrees_from_the_spec() -> None:
    topo = Topology.from_rank(0, 4, 2)
    composed = ParallelDims.from_spec(ParallelSpec(expert_parallel=2, shard="full"), topo)
    assert (composed.dp_replicate, composed.dp_shard, composed.ep) == (1, 4, 2)
    assert composed.fsdp_enabled and composed.ep_enabled
    ddp = ParallelDims.from_spec(ParallelSpec(), topo)
    assert (ddp.dp_replicate, ddp.dp_shard, ddp.ep) == (4, 1, 1)
    tp = ParallelDims.from_spec(ParallelSpec(tensor_parallel=2, shard="full"), Topology.from_rank(3, 4, 2))
    assert (tp.dp_shard, tp.tp, tp.dp, tp.dp_rank) == (2, 2, 2, 1)  # tp innermost: ranks 2, 3 share batch 1
    one = ParallelDims.from_spec(ParallelSpec(shard="full"), Topology.from_rank(0, 1, 1))
    assert (one.dp_replicate, one.dp_shard) == (1, 1) and not one.fsdp_enabled  # a world of one shards nothing


def _check_views(topo: Topology) -> None:
    dims = ParallelDims(topo, dp_shard=topo.world_size, ep=4).build("cpu")
    layout = ep_layout(topo, 4)
    assert dims.ranks("dp_shard") == list(range(topo.world_size)) and dims.ranks("dp_replicate") == [topo.rank]
    groups = dims.expert_groups
    assert groups.ep_ranks in layout["ep"] and groups.edp_ranks in layout["edp"]
    assert groups.intra_ranks in layout["intra"] and groups.inter_ranks in layout["inter"]
    assert groups.hierarchical_ok and groups.nodes_per_ep == 2
    assert dims.mesh("experts").mesh.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]][: topo.world_size // 4]
    t = torch.ones(1)
    dist.all_reduce(t, group=dims.group("ep_node"))  # the inter-node ("rail") group of this EP group
    assert t.item() == 2


@pytest.mark.distributed
def test_one_mesh_gives_the_node_aware_groups() -> None:
    spawn(_check_views, 4, 2)


def _check_pipeline_views(topo: Topology) -> None:
    """pp outermost: stages are contiguous blocks of ranks, and every other view stays inside one."""
    dims = ParallelDims(topo, dp_replicate=2, ep=2, pp=2).build("cpu")
    r = topo.rank
    block = [0, 1] if r < 2 else [2, 3]
    assert dims.ranks("pp") == [r % 2, r % 2 + 2] and dims.pp_rank == r // 2 and dims.dp_rank == r % 2
    assert dims.ranks("dp") == block and dims.ranks("dp_replicate") == block and dims.ranks("ep") == block
    assert dims.ranks("edp") == [r]
    t = torch.ones(1)
    dist.all_reduce(t, group=dims.group("pp"))
    assert t.item() == 2


@pytest.mark.distributed
def test_pipeline_stages_are_the_outermost_mesh_dim() -> None:
    spawn(_check_pipeline_views, 4, 2)
