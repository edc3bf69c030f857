"""The interface every parallelism mode implements, and what they share.

A `ParallelPlan` owns how one worker's model is wrapped, how a step's gradients are reduced,
clipped and applied, and what its training state looks like to a checkpoint. The Trainer calls
only this interface:

    with plan.micro_batch(last): loss = plan.module(x, y); plan.backward(loss / accum)
    grad_norm = plan.step()                    # reduce, clip (global norm), optimizer + scheduler
    plan.state_dict() / plan.load_state_dict()  # canonical names, sharded tensors as DTensors

State dicts use canonical parameter names, the names of a single worker holding every expert: an
expert-parallel shard `...experts.local.w_up` is saved as `...experts.w_up`, a DTensor over the
(edp, ep) mesh placed Shard(0) on ep. torch.distributed.checkpoint (DCP) then writes each rank's
own chunks and reads any layout back, which is what makes resharding on resume the normal path.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from shardyard.models.moe.experts import is_expert_shard

EXPERT_LOCAL = ".local."  # ExpertParallelExperts keeps this rank's experts in its `local` module


def canonical_name(name: str) -> str:
    return name.replace(EXPERT_LOCAL, ".")


class ParallelPlan(ABC):
    """One worker's view of a parallelism mode (see the module docstring)."""

    name: str = "plan"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        grad_clip: float,
    ) -> None:
        self.model = model  # the bare model (FSDP2 shards it in place)
        self.module: nn.Module = model  # what the forward is called on (a DDP wrapper, an engine)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")

    # ------------------------------------------------------------------------------- training
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; gradients sync on the `last` only."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Reduce gradients, clip by the global norm, step optimizer and scheduler, clear gradients.
        Returns the global gradient norm before clipping (the same on every rank)."""

    def _apply(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------- state
    def layout(self) -> dict[str, Any]:
        """What the checkpoint's tensors depend on; resuming under another layout reshards."""
        return {"mode": self.name, "world": dist.get_world_size() if dist.is_initialized() else 1}

    def state_dict(self) -> dict[str, Any]:
        """{"model": ..., "optim": ...} with canonical names; tensors plain or DTensor (collective)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = get_model_state_dict(self.model)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)
        return {
            "model": {canonical_name(k): self._export_tensor(k, v) for k, v in model_sd.items()},
            "optim": {
                "state": {
                    canonical_name(k): {key: self._export_tensor(k, v) for key, v in entry.items()}
                    for k, entry in optim_sd["state"].items()
                },
                "param_groups": [
                    {**g, "params": [canonical_name(p) for p in g["params"]]} for g in optim_sd["param_groups"]
                ],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict()` gave (after DCP filled it from a checkpoint of any layout)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        names = {canonical_name(n): n for n, _ in self.model.named_parameters()}
        names.update({canonical_name(n): n for n, _ in self.model.named_buffers()})
        model_sd = {names.get(k, k): self._import_tensor(v) for k, v in state["model"].items()}
        optim_sd = {
            "state": {
                names.get(k, k): {key: self._import_tensor(v) for key, v in entry.items()}
                for k, entry in state["optim"]["state"].items()
            },
            "param_groups": [
                {**g, "params": [names.get(p, p) for p in g["params"]]} for g in state["optim"]["param_groups"]
            ],
        }
        set_model_state_dict(self.model, model_sd)
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd)

    # Plans with expert shards override these two: local shards become DTensors over the mesh and back.
    def _export_tensor(self, name: str, value: Any) -> Any:
        return value

    def _import_tensor(self, value: Any) -> Any:
        return value


# ------------------------------------------------------------------------------ shared helpers
def local_square_norm(grads: Iterator[torch.Tensor]) -> torch.Tensor:
    """Sum of squares (float64, on CPU) of the given gradients' LOCAL elements (a DTensor's shard)."""
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        total += local.detach().double().square().sum().cpu()
    return total


@torch.no_grad()
def scale_grads(params: list[nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if is_expert_shard(p)]
