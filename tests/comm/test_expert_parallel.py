"""A 4-worker expert-parallel run equals one worker holding all experts (same weights, all batches).

Real gloo groups (views of one device mesh), 4 ranks faking 2 nodes of 2. Outputs and gradients
(after sync_gradients) must
match the single-worker reference within float tolerance, for flat, hierarchical and leader.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardyard.comm.alltoall import ALGORITHMS
from shardyard.comm.grad_sync import sync_gradients
from shardyard.comm.launch import spawn
from shardyard.comm.token_dispatch import TransportDispatcher
from shardyard.comm.topology import Topology
from shardyard.models.moe.accounting import moe_scope
from shardyard.models.moe.experts import is_expert_shard
from shardyard.models.moe.layer import MoELayer
from shardyard.platform.schema import ParallelSpec
from shardyard.runtime.parallel.dims import replicated_dims
from shardyard.runtime.parallel.parallelize import place_experts

WIDTH, HIDDEN, EXPERTS, TOKENS = 16, 24, 8, 24


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.moe = MoELayer(WIDTH, HIDDEN, EXPERTS, top_k=2)
        self.moe2 = MoELayer(WIDTH, HIDDEN, EXPERTS, top_k=1, router="switch", expert_kind="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.moe(self.inp(x))
        return self.moe2(h) + h


def _loss(net: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(x)
    return out, out.square().mean()  # the layers' aux losses ride along in backward


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(100 + rank))


def _check_ep(topo: Topology) -> None:
    torch.manual_seed(0)
    ref = Net()
    weights = copy.deepcopy(ref.state_dict())
    # reference: one worker, all experts, the mean of every rank's loss
    ref_out = {}
    total = torch.zeros(())
    for r in range(topo.world_size):
        with moe_scope(weight=1 / topo.world_size):  # each rank's aux loss counts 1/world, like its CE
            out, loss = _loss(ref, _batch(r))
        ref_out[r] = out.detach()
        total = total + loss / topo.world_size
    total.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    for ep, algo in [(4, a) for a in ALGORITHMS] + [(2, "hierarchical")]:
        groups = replicated_dims(topo, ep).expert_groups
        net = Net()
        net.load_state_dict(weights)
        net = place_experts(net, groups, ParallelSpec(a2a=algo))
        assert isinstance(net.moe.dispatcher, TransportDispatcher)
        out, loss = _loss(net, _batch(topo.rank))
        torch.testing.assert_close(out.detach(), ref_out[topo.rank], rtol=1e-5, atol=1e-6)
        loss.backward()
        sync_gradients(net, groups)
        per = EXPERTS // ep
        lo = groups.ep_rank * per
        for name, p in net.named_parameters():
            if is_expert_shard(p):
                expect = ref_grads[name][lo : lo + per]
                torch.testing.assert_close(p.detach(), dict(ref.named_parameters())[name].detach()[lo : lo + per])
            else:
                expect = ref_grads[name]
            torch.testing.assert_close(
                p.grad, expect, rtol=1e-5, atol=1e-7, msg=lambda m: f"{algo} ep={ep} {name}: {m}"
            )
    with pytest.raises(ValueError, match="divide num_experts"):
        TransportDispatcher(5, WIDTH, groups, "flat")  # 5 experts, ep 2
    dist.barrier()


@pytest.mark.distributed
def test_expert_parallel_matches_single_worker() -> None:
    spawn(_check_ep, 4, 2)
