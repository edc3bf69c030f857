"""Expert parallelism and/or FSDP2 sharding over one device mesh (torchtitan's dp2ep layout).

The world is a mesh (edp, ep): EP groups are contiguous blocks of `ep` ranks, each holding E/ep of
every MoE layer's experts; EDP groups are the ranks holding the same expert shard. Dense weights
are either replicated (`parallel.shard: none`, gradients all-reduced explicitly over the world) or
sharded with FSDP2 over all ranks (`zero2` / `full`), their gradients reduce-scattered and their
optimizer state living only on the owning rank. Expert parameters stay outside FSDP when ep > 1:
their gradients are summed over EDP. With ep == 1 FSDP shards the expert stacks too (dim 0).

Gradients are those of the world-mean loss: FSDP divides by the world size; expert gradients,
which already sum every EP peer's tokens (the all-to-all backward brings them home), are summed
over EDP and divided by the world size as well. The clip uses the norm of the whole (unsharded)
model: squares of local shards summed over the world for sharded dense parameters, over EP for
experts, and taken once for replicated dense gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardyard.comm.expert_parallel import all_reduce_mean_, apply_expert_parallel
from shardyard.comm.groups import ProcessGroups
from shardyard.platform.schema import ParallelSpec
from shardyard.runtime.parallel.base import EXPERT_LOCAL, ParallelPlan, expert_params, local_square_norm, scale_grads


def _shard_targets(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one (each transformer block), before the root."""
    from shardyard.models.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


class MeshPlan(ParallelPlan):
    name = "mesh"

    def __init__(
        self,
        model: nn.Module,
        build_optimizer,
        build_scheduler,
        grad_clip: float,
        *,
        groups: ProcessGroups | None,
        ep: int,
        shard: str,
        a2a: ParallelSpec | str,
        device: torch.device,
    ) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.ep, self.shard, self.world = ep, shard, world
        self.groups = groups
        self.expert_mesh: DeviceMesh | None = None
        if ep > 1:
            assert groups is not None
            apply_expert_parallel(model, groups, a2a)  # a2a: spec.parallel (algorithm + dispatch stages)
            self.expert_mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
        self.experts = expert_params(model)
        if shard != "none":
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
            ignored = set(self.experts)
            for module in _shard_targets(model):
                fully_shard(module, mesh=mesh, reshard_after_forward=shard == "full", ignored_params=ignored)
            fully_shard(model, mesh=mesh, reshard_after_forward=shard == "full", ignored_params=ignored)
        # The optimizer is built after sharding so that its state is created per shard.
        optimizer = build_optimizer(model)
        super().__init__(model, optimizer, build_scheduler(optimizer), grad_clip)
        expert_ids = {id(p) for p in self.experts}
        self.dense = [p for p in model.parameters() if id(p) not in expert_ids and p.requires_grad]
        self.name = f"mesh(ep={ep}, shard={shard})"

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if self.shard != "none":
            self.model.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last only
        return contextlib.nullcontext()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        self._reduce_replicated_grads()
        dense_sq = local_square_norm(p.grad for p in self.dense if p.grad is not None)
        expert_sq = local_square_norm(p.grad for p in self.experts if p.grad is not None)
        if self.shard != "none" and self.world > 1:
            dense_sq = self._all_reduce(dense_sq, None)  # each rank holds a disjoint shard
        if self.ep > 1:
            expert_sq = self._all_reduce(expert_sq, self.groups.ep)
        total = (dense_sq + expert_sq).sqrt().float()
        scale_grads(self.dense + self.experts, total, self.max_norm)
        self._apply()
        return total

    def _all_reduce(self, value: torch.Tensor, group) -> torch.Tensor:
        device = self.dense[0].device if self.dense else torch.device("cpu")
        value = value.to(device)
        dist.all_reduce(value, group=group)
        return value.cpu()

    def _reduce_replicated_grads(self) -> None:
        """Gradients no FSDP reduces: expert shards over EDP, and dense ones when not sharded."""
        if self.world == 1:
            return
        if self.shard == "none":
            all_reduce_mean_(self.dense, None, self.world)
        if self.ep > 1:
            all_reduce_mean_(self.experts, self.groups.edp, self.world)

    def layout(self) -> dict[str, Any]:
        return {"mode": "mesh", "world": self.world, "ep": self.ep, "shard": self.shard}

    # ------------------------------------------------------------------ expert shards as DTensors
    def _export_tensor(self, name: str, value: Any) -> Any:
        if (
            self.expert_mesh is not None
            and EXPERT_LOCAL in name
            and isinstance(value, torch.Tensor)
            and not isinstance(value, DTensor)
            and value.dim() >= 1
        ):
            shape = (value.shape[0] * self.ep, *value.shape[1:])
            return DTensor.from_local(
                value,
                self.expert_mesh,
                [Replicate(), Shard(0)],
                run_check=False,
                shape=torch.Size(shape),
                stride=torch.empty(shape, device="meta").stride(),
            )
        return value

    def _import_tensor(self, value: Any) -> Any:
        if self.expert_mesh is not None and isinstance(value, DTensor) and value.device_mesh is self.expert_mesh:
            return value.to_local()
        return value


class HookReducedPlan(MeshPlan):
    """Data (and optionally expert) parallelism whose gradients are reduced from their
    post-accumulate-grad hooks by optim.layerwise.LayerwiseStepper instead of DDP: layer-wise GaLore
    (each parameter stepped and its gradient freed as soon as its reduction lands) and Q-GaLore's
    INT8-weight models (whose gradient handles DDP cannot broadcast). Checkpoints and expert shards
    as MeshPlan (shard: none)."""

    def __init__(
        self,
        model: nn.Module,
        build_optimizer,
        build_scheduler,
        grad_clip: float,
        *,
        groups: ProcessGroups | None,
        ep: int,
        a2a: ParallelSpec | str,
        device: torch.device,
    ) -> None:
        from shardyard.optim.layerwise import LayerwiseStepper

        super().__init__(
            model,
            build_optimizer,
            build_scheduler,
            grad_clip,
            groups=groups,
            ep=ep,
            shard="none",
            a2a=a2a,
            device=device,
        )
        self.stepper = LayerwiseStepper(
            model,
            self.optimizer,
            dense_group=None,
            expert_group=groups.edp if groups is not None else None,
            world_size=self.world,
            max_norm=grad_clip,
        ).attach()
        self.name = f"hook-reduced(ep={ep})"

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.stepper.accumulate = not last  # gradients accumulate locally until the last micro-batch
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        norm = self.stepper.finish()  # reduces, clips, steps (the optimizer's step hooks included)
        self.scheduler.step()
        return norm.detach().float().cpu()
