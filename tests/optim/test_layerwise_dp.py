"""Layer-wise GaLore under data parallelism (LayerwiseStepper) on real gloo ranks.

- 2 and 4 workers: the same weights as non-layer-wise GaLore under DDP (tolerance: float
  reassociation of different bucketings), with and without gradient accumulation, Q-GaLore on
  INT8 layers included (its reference averages gradients explicitly: DDP cannot broadcast INT8
  handles; the stepper's whole-model mode is checked against it too); the returned grad norm equals the DDP run's global norm; peak gradient
  bytes per rank, measured from the hooks, about one bucket.
- Expert parallelism (2 ranks, ep 2): layer-wise stepping with expert gradients reduced over the
  expert-data-parallel group equals the explicit sync_gradients + step() path, and both equal one
  worker holding every expert (per-expert projectors on each shard); the stepper's global grad norm
  equals the single worker's at every step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shardyard.comm.launch import spawn
from shardyard.comm.topology import Topology
from shardyard.optim import build_optimizer, prepare_model_for_optimizer
from shardyard.optim.int8_weights import int8_weight_of
from shardyard.optim.layerwise import LayerwiseStepper
from shardyard.platform.schema import OptimSpec
from tests.optim.galore_helpers import batches, tiny_model

STEPS, BUCKET = 4, 16 << 10


def _spec(kind: str, layerwise: bool) -> OptimSpec:
    extra = {"quant": {"stochastic_rounding": False}} if kind == "q_galore_adamw" else {}
    return OptimSpec(
        kind=kind,
        lr=1e-2,
        weight_decay=0.1,
        grad_clip=0.0,
        galore={"rank": 8, "update_gap": 2, "layerwise": layerwise, **extra},
    )


def _flat_weights(model: nn.Module) -> torch.Tensor:
    parts = []
    for m in model.modules():
        for _name, p in m.named_parameters(recurse=False):
            owner = int8_weight_of(p)
            parts.append((owner[0].dequantized(owner[1]) if owner else p.detach()).flatten())
    return torch.cat(parts)


def _dp_rank(topo: Topology) -> None:
    rank, world = topo.rank, topo.world_size
    for kind, accum in (("galore_adamw", 1), ("galore_adamw", 2), ("q_galore_adamw", 1)):
        data = [batches(accum, seed=1000 * step + 10 * rank) for step in range(STEPS)]  # per-rank data
        # reference: non-layer-wise GaLore under DDP (no_sync for all but the last micro-batch)
        ref = prepare_model_for_optimizer(tiny_model(), _spec(kind, False))
        ddp = DDP(ref) if kind == "galore_adamw" else None  # DDP cannot broadcast INT8 handles
        opt_ref = build_optimizer(_spec(kind, False), ref)
        ref_norms = []
        for micro in data:
            for i, x in enumerate(micro):
                if ddp is not None and i < accum - 1:
                    with ddp.no_sync():
                        (ddp(x[:, :-1], x[:, 1:])[1] / accum).backward()
                else:
                    ((ddp or ref)(x[:, :-1], x[:, 1:])[1] / accum).backward()
            if ddp is None:  # explicit averaging, as the EP path does
                for p in ref.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
            opt_ref.step()
            opt_ref.zero_grad(set_to_none=True)

        model = prepare_model_for_optimizer(tiny_model(), _spec(kind, True))
        opt = build_optimizer(_spec(kind, True), model, dist.group.WORLD)  # the stepper drives it
        stepper = LayerwiseStepper(model, opt, None, None, world, BUCKET).attach()
        total_grad = sum(p.numel() * 4 for p in model.parameters())
        largest = max(p.numel() * 4 for p in model.parameters())
        for step, micro in enumerate(data):
            for i, x in enumerate(micro):
                stepper.accumulate = i < accum - 1
                (model(x[:, :-1], x[:, 1:])[1] / accum).backward()
            if accum == 1:  # stepped and freed during backward, except the buckets still in flight
                alive = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
                assert alive <= 2 * (BUCKET + largest) and alive < 0.5 * total_grad, (alive, total_grad)
            norm = stepper.finish()
            torch.testing.assert_close(norm, ref_norms[step].float(), rtol=1e-4, atol=1e-6)
            opt.step()  # a no-op in layer-wise mode
        # 4 ranks sum in a different order than DDP; Adam amplifies last-bit differences of tiny gradients
        torch.testing.assert_close(
            _flat_weights(model), _flat_weights(ref), rtol=1e-4, atol=5e-5, msg=lambda m: f"{kind} accum {accum}: {m}"
        )
        if accum == 1:
            assert stepper.peak_grad_bytes <= 2 * (BUCKET + largest), (stepper.peak_grad_bytes, BUCKET)
            assert stepper.peak_grad_bytes < 0.5 * total_grad, (stepper.peak_grad_bytes, total_grad)
        stepper.detach()
        if kind == "q_galore_adamw":  # whole-model steps: the stepper replaces DDP for INT8 layers
            whole = prepare_model_for_optimizer(tiny_model(), _spec(kind, False))
            opt_whole = build_optimizer(_spec(kind, False), whole, dist.group.WORLD)
            whole_stepper = LayerwiseStepper(whole, opt_whole, None, None, world, BUCKET).attach()
            for step, micro in enumerate(data):
                (whole(micro[0][:, :-1], micro[0][:, 1:])[1]).backward()
                torch.testing.assert_close(whole_stepper.finish(), ref_norms[step].float(), rtol=1e-4, atol=1e-6)
                assert all(p.grad is None for p in whole.parameters())
            torch.testing.assert_close(_flat_weights(whole), _flat_weights(ref), rtol=1e-4, atol=5e-5)
        gathered = [torch.empty_like(_flat_weights(model)) for _ in range(world)]
        dist.all_gather(gathered, _flat_weights(model))
        assert all(torch.equal(gathered[0], g) for g in gathered[1:]), "ranks diverged"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_layerwise_dp_equals_ddp_galore(world: int) -> None:
    spawn(_dp_rank, world, world)


# ------------------------------------------------------------------------- expert parallelism
def _moe_batches(rank: int, steps: int) -> list[torch.Tensor]:
    return batches(steps, seed=500 + rank)


def _ep_rank(topo: Topology) -> None:
    from shardyard.comm.grad_sync import sync_gradients
    from shardyard.models import build_model
    from shardyard.models.moe.accounting import moe_scope
    from shardyard.models.moe.experts import is_expert_shard
    from shardyard.platform.schema import ModelSpec, ParallelSpec
    from shardyard.runtime.parallel.dims import replicated_dims
    from shardyard.runtime.parallel.parallelize import place_experts

    steps, world = 3, topo.world_size
    mspec = ModelSpec(kind="moe", width=32, depth=2, heads=2, ffn={"hidden": 64}, moe={"num_experts": 4, "top_k": 2})
    torch.manual_seed(0)
    base = build_model(mspec, 16)
    start = copy.deepcopy(base.state_dict())
    spec = OptimSpec(kind="galore_adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.0, galore={"rank": 4, "update_gap": 2})
    lw_spec = OptimSpec(
        kind="galore_adamw",
        lr=1e-2,
        weight_decay=0.1,
        grad_clip=0.0,
        galore={"rank": 4, "update_gap": 2, "layerwise": True},
    )
    # reference: one worker, every expert, the mean of every rank's loss
    ref = build_model(mspec, 16)
    ref.load_state_dict(start)
    opt_ref = build_optimizer(spec, ref)
    data = {r: _moe_batches(r, steps) for r in range(world)}
    ref_norms = []
    for step in range(steps):
        for r in range(world):
            with moe_scope(weight=1 / world):  # each rank's aux loss carries 1/world of the step, like its ce
                (_moe_loss(ref, data[r][step]) / world).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).float())
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    groups = replicated_dims(topo, world).expert_groups
    results = {}
    for mode in ("sync", "layerwise"):
        net = build_model(mspec, 16)
        net.load_state_dict(start)
        place_experts(net, groups, ParallelSpec())
        opt = build_optimizer(lw_spec if mode == "layerwise" else spec, net, dist.group.WORLD)
        stepper = None
        if mode == "layerwise":
            stepper = LayerwiseStepper(net, opt, None, groups.edp, world, 8 << 10).attach()
        for step in range(steps):
            _moe_loss(net, data[topo.rank][step]).backward()
            if stepper is None:
                sync_gradients(net, groups)
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:  # the global norm of the reduced gradients (every expert shard once) is the reference's
                torch.testing.assert_close(stepper.finish(), ref_norms[step], rtol=1e-4, atol=1e-6)
        results[mode] = {n: p.detach().clone() for n, p in net.named_parameters()}
    per = 4 // world
    lo = groups.ep_rank * per
    ref_params = dict(ref.named_parameters())
    sharded = {n for n, p in net.named_parameters() if is_expert_shard(p)}
    for name, p in results["layerwise"].items():
        torch.testing.assert_close(p, results["sync"][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        full = ref_params[name].detach()
        expect = full[lo : lo + per] if name in sharded else full
        # atol as the other single-worker comparisons here: Adam's near-zero-gradient elements
        torch.testing.assert_close(p, expect, rtol=1e-4, atol=5e-5, msg=lambda m: f"vs single worker {name}: {m}")


def _moe_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, ce = model(x[:, :-1], x[:, 1:])  # the MoE aux losses are attached to the backward
    return ce


@pytest.mark.distributed
@pytest.mark.slow
def test_layerwise_with_expert_parallel_equals_sync_and_single_worker() -> None:
    spawn(_ep_rank, 2, 2)
