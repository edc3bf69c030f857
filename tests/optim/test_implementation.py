"""optim.implementation: which torch kernel each layout gets, and the fused kernel's steps against the
for-loop's (torch's CPU default, what every job stepped with before the field existed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from shardyard.comm.launch import spawn
from shardyard.models import build_model
from shardyard.optim import build_optimizer, kernel_options
from shardyard.platform.spec import load_spec

SPEC = "jobs/moe-tiny.yaml"
SMALL = ["model.width=32", "model.depth=2", "model.heads=2", "model.moe.num_experts=8", "tracking.mode=disabled"]


def _spec(implementation: str, kind: str = "adamw"):
    return load_spec(SPEC, [*SMALL, f"optim.implementation={implementation}", f"optim.kind={kind}"])


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_steps_equal_the_for_loop_within_rounding(kind: str) -> None:
    torch.manual_seed(0)
    spec = _spec("for-loop", kind)
    model = build_model(spec.model, spec.data.seq_len)
    models = {impl: copy.deepcopy(model) for impl in ("for-loop", "foreach", "fused")}
    optimizers = {impl: build_optimizer(_spec(impl, kind).optim, m) for impl, m in models.items()}
    assert optimizers["fused"].param_groups[0]["fused"] is True
    assert optimizers["for-loop"].param_groups[0]["foreach"] is False
    for step in range(5):
        grads = [torch.randn_like(p) * 10 ** (-step) for p in model.parameters()]
        for m in models.values():
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        for optimizer in optimizers.values():
            optimizer.step()
    moved = max(float((a - b).abs().max()) for a, b in zip(models["for-loop"].parameters(), model.parameters()))
    assert moved > 1e-3  # the steps did something
    for impl in ("foreach", "fused"):
        for (name, a), b in zip(models[impl].named_parameters(), models["for-loop"].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{impl}: {name}")


def _mixed_rank(topology) -> None:
    mesh = init_device_mesh("cpu", (1,))
    sharded = nn.Linear(4, 4, bias=False)
    sharded.weight = nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh, [Shard(0)]))
    assert kernel_options("fused", sharded) == {"fused": True}  # all DTensors: fused
    mixed = nn.Sequential(sharded, nn.Linear(4, 4))  # a DTensor beside plain tensors (expert shards)
    assert kernel_options("fused", mixed) == {"foreach": False}
    assert kernel_options("foreach", mixed) == {"foreach": False}
    optimizer = torch.optim.AdamW(mixed.parameters(), **kernel_options("fused", mixed))
    for p in mixed.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # torch's fused and foreach kernels refuse this mix; the for-loop steps it


def test_meta_and_mixed_parameters_take_the_for_loop() -> None:
    plain = nn.Linear(4, 4)
    assert kernel_options("fused", plain) == {"fused": True}
    assert kernel_options("foreach", plain) == {"foreach": True}
    assert kernel_options("for-loop", plain) == {"foreach": False}
    assert kernel_options("fused", nn.Linear(4, 4, device="meta")) == {"foreach": False}
    spawn(_mixed_rank, 1, 1)  # a DTensor needs a process group: its own process
