"""flat, hierarchical and leader all-to-all on real gloo groups: 4 ranks, 2 fake ranks per node.

All three only move rows, so they must agree with flat bit for bit, forward and backward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from shardyard import envvars
from shardyard.comm.alltoall import ALGORITHMS, build_all_to_all, run_route, transpose_index
from shardyard.comm.groups import ep_layout
from shardyard.comm.launch import spawn
from shardyard.comm.topology import Topology
from shardyard.runtime.parallel.dims import replicated_dims


def test_topology_fake_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv(envvars.FAKE_RANKS_PER_NODE, "2")
    t = Topology.from_env()
    assert (t.node_rank, t.local_rank, t.ranks_per_node, t.num_nodes) == (1, 1, 2, 2)
    monkeypatch.delenv(envvars.FAKE_RANKS_PER_NODE)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("NODE_RANK", "0")
    assert Topology.from_env() == Topology(4, 3, 0, 3, 4)
    with pytest.raises(ValueError, match="node-major"):
        Topology(4, 3, 0, 1, 2)


def test_ep_layout() -> None:
    lay = ep_layout(Topology.from_rank(0, 8, 2), 4)
    assert lay["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay["intra"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay["inter"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError):
        ep_layout(Topology.from_rank(0, 8, 2), 3)


def test_transpose_index() -> None:
    sizes = np.array([[1, 0, 2], [3, 1, 0]])  # blocks a0b0 a0b1 a0b2 a1b0 a1b1 a1b2
    idx = transpose_index(sizes).tolist()  # rows: a0b0=[0], a0b2=[1,2], a1b0=[3,4,5], a1b1=[6]
    assert idx == [0, 3, 4, 5, 6, 1, 2]


def _splits(rank: int, size: int, step: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    s = torch.randint(0, 6, (size,), generator=g)
    if step == 1:
        s[(rank + 1) % size] = 0  # empty messages too
    return s.tolist()


def _check_all(topo: Topology) -> None:
    groups = replicated_dims(topo, ep=topo.world_size).expert_groups
    width = 5
    for step in range(3):
        splits = _splits(topo.rank, topo.world_size, step)
        x = (torch.arange(sum(splits) * width, dtype=torch.float32).view(-1, width) + 1000 * topo.rank).requires_grad_(
            True
        )
        results = {}
        for name in ALGORITHMS:
            a2a = build_all_to_all(name, groups)
            assert a2a.name == name
            xi = x.detach().clone().requires_grad_(True)
            route = a2a.route(torch.tensor(splits).view(-1, 1))
            y, recv = run_route(xi, route), route.recv_splits
            w = torch.linspace(-1, 1, y.numel()).view_as(y) + topo.rank
            z = run_route(y * w, route.reverse())
            (z.sin().sum() + (y**2).sum()).backward()
            results[name] = (y.detach(), list(recv), z.detach(), xi.grad)
        # rows from rank i are that rank's block for me, in order
        y, recv, z, _ = results["flat"]
        expect = []
        for src in range(topo.world_size):
            s = _splits(src, topo.world_size, step)
            start = sum(s[: topo.rank])
            base = torch.arange(sum(s) * width, dtype=torch.float32).view(-1, width) + 1000 * src
            expect.append(base[start : start + s[topo.rank]])
        assert torch.equal(y, torch.cat(expect))
        assert recv == [_splits(src, topo.world_size, step)[topo.rank] for src in range(topo.world_size)]
        for name in ALGORITHMS[1:]:
            for a, b in zip(results["flat"], results[name]):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), name
                else:
                    assert a == b, name
        # the reverse route brings every row home unchanged
        for name in ALGORITHMS:
            route = build_all_to_all(name, groups).route(torch.tensor(splits).view(-1, 1))
            assert torch.equal(route.reverse().run(route.run(x.detach())), x.detach()), name
    dist.barrier()


@pytest.mark.distributed
def test_algorithms_agree_bitwise_4_ranks_2_nodes() -> None:
    spawn(_check_all, 4, 2)


def _check_three_nodes(topo: Topology) -> None:
    groups = replicated_dims(topo, ep=topo.world_size).expert_groups
    splits = _splits(topo.rank, topo.world_size, 2)
    x = torch.randn(sum(splits), 3, generator=torch.Generator().manual_seed(topo.rank))
    ys = [run_route(x, build_all_to_all(n, groups).route(torch.tensor(splits).view(-1, 1))) for n in ALGORITHMS]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.distributed
@pytest.mark.slow
def test_algorithms_agree_6_ranks_3_nodes() -> None:
    spawn(_check_three_nodes, 6, 2)
