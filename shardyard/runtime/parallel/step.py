"""The gradient step beside the parallelized model: how a step's gradients are reduced, clipped and
applied. The Trainer calls only this interface:

    with step.micro_batch(last): loss = module(x, y); step.backward(loss / accum)
    grad_norm = step.step()     # reduce, clip (the global norm, optim.clip), optimizer + scheduler

Gradients are those of the world-mean loss. `ReducedStep` covers the wrapper-reduced modes (DDP,
FSDP2 reduce-scatter) and the explicit reductions beside them (comm.grad_sync: expert shards over
EDP, replicated dense weights over dp_replicate when expert parallelism rules DDP out);
`HookReducedStep` hands reduction and stepping to optim.layerwise.LayerwiseStepper (layer-wise GaLore,
and Q-GaLore's INT8 weights under data parallelism). A backend with its own engine implements this
interface in its own module of runtime/parallel.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardyard.comm.grad_sync import sync_gradients
from shardyard.optim.clip import clip_grad_norm_
from shardyard.optim.layerwise import LayerwiseStepper
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.tensor_parallel import sum_partial_grads_over_tp


class GradientStep:
    """The interface, and the optimizer + scheduler step every mode shares."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; gradients sync on the `last` only."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Reduce gradients, clip by the global norm, step optimizer and scheduler, clear gradients.
        Returns the global gradient norm before clipping (the same on every rank)."""
        raise NotImplementedError

    def _apply(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class ReducedStep(GradientStep):
    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dims: ParallelDims,
        grad_clip: float,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.model, self.module, self.dims, self.grad_clip = model, module, dims, grad_clip
        self.ddp = isinstance(module, DistributedDataParallel)
        self.explicit = dims.world_size > 1 and not self.ddp  # what no wrapper reduces, reduced here
        self.expert_group = dims.group("ep")
        self.stage_group = dims.group("pp") if dims.pp_enabled else None  # stages hold disjoint parameters

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if self.dims.fsdp_enabled and not self.dims.pp_enabled:  # a pipeline stage syncs at its schedule's end
            self.model.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last only
        if self.ddp and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        if self.dims.tp_enabled:  # what each tp rank computed from its own heads or tokens
            sum_partial_grads_over_tp(self.model, self.dims.group("tp"))
        if self.explicit:
            sync_gradients(
                self.model,
                self.dims.expert_groups,
                dense_group=self.dims.group("dp_replicate"),
                dense=not self.dims.fsdp_enabled,
                replicas=self.dims.dp,
            )
        norm = clip_grad_norm_(self.model.parameters(), self.grad_clip, self.expert_group, self.stage_group)
        self._apply()
        return norm


class HookReducedStep(GradientStep):
    """Gradients reduced from their post-accumulate-grad hooks by a LayerwiseStepper instead of DDP:
    layer-wise GaLore (each parameter stepped and its gradient freed as soon as its reduction lands)
    and Q-GaLore's INT8-weight models (whose gradient handles DDP cannot broadcast)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dims: ParallelDims,
        grad_clip: float,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.stepper = LayerwiseStepper(
            model,
            optimizer,
            dense_group=dims.group("dp_replicate"),
            expert_group=dims.group("edp"),
            world_size=dims.world_size,
            max_norm=grad_clip,
        ).attach()

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.stepper.accumulate = not last  # gradients accumulate locally until the last micro-batch
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        norm = self.stepper.finish()  # reduces, clips, steps (the optimizer's step hooks included)
        self.scheduler.step()
        return norm.detach().float().cpu()
