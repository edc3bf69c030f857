"""Small models and training loops shared by the optimizer tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from shardyard.models import build_model
from shardyard.platform.schema import ModelSpec

SEQ = 16


def tiny_model(seed: int = 0, kind: str = "dense", **ffn: object) -> nn.Module:
    torch.manual_seed(seed)
    spec = ModelSpec(kind=kind, width=32, depth=2, heads=2, ffn={"hidden": 64, **ffn})
    return build_model(spec, SEQ)


def batches(n: int, seed: int = 1, batch: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, SEQ + 1), generator=gen) for _ in range(n)]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[torch.Tensor],
    before_step: Callable[[], None] | None = None,
) -> list[float]:
    losses = []
    for x in data:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if before_step:
            before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0, rtol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


DDP_CONFIGS: list[tuple[str, dict]] = [
    ("galore_adamw", {"projection": "svd"}),
    ("galore_adamw", {"projection": "randomized"}),
    ("galore_adamw", {"projection": "svd", "broadcast_projection": True}),
    ("q_galore_adamw", {"projection": "randomized"}),
]


def spawn_ddp(world: int, steps: int) -> None:
    """`world` real gloo ranks (spawned processes) each running ddp_worker."""
    from shardyard.comm.launch import spawn

    spawn(_ddp_rank, world, world, steps)


def _ddp_rank(topology, steps: int) -> None:
    ddp_worker(steps)


def ddp_worker(steps: int) -> None:
    """On each gloo rank: DDP-train the tiny model on rank-specific data with every DDP_CONFIGS
    optimizer and check that all ranks end with bitwise identical weights and projections."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from shardyard.optim import build_optimizer
    from shardyard.platform.schema import OptimSpec

    torch.set_num_threads(1)  # two ranks on a shared 2-core box: multi-threaded LAPACK (the SVDs) stalls or aborts
    rank, world = dist.get_rank(), dist.get_world_size()
    for kind, galore in DDP_CONFIGS:
        model = tiny_model(seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        ddp = DDP(model)
        spec = OptimSpec(kind=kind, lr=1e-2, galore={"rank": 8, "update_gap": 2, **galore})
        opt = build_optimizer(spec, model, dist.group.WORLD)  # the projection is broadcast over it
        for x in batches(steps, seed=100 + rank):  # different data on every rank
            _, loss = ddp(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        bases = [st["basis"] if "basis" in st else st["basis_q"].float() for st in opt.state.values() if "side" in st]
        assert bases, "nothing was projected"
        flat = torch.cat([flat] + [b.flatten() for b in bases])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        for other in gathered[1:]:
            assert torch.equal(gathered[0], other), f"{kind} {galore}: ranks diverged"
        assert not torch.equal(flat[: start.numel()], start), "weights did not move"


def one_thread() -> Iterator[None]:
    """Fixture body: run a test single-threaded (multi-threaded LAPACK stalls on a shared 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
