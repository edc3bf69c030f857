"""Plain data parallelism: every rank holds the whole model; DDP averages gradients (one process:
no wrapper at all)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shardyard.runtime.parallel.base import ParallelPlan


class ReplicatedPlan(ParallelPlan):
    name = "replicated"

    def __init__(self, model, optimizer, scheduler, grad_clip: float, device: torch.device) -> None:
        super().__init__(model, optimizer, scheduler, grad_clip)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # No buffer sync in forward: MoE layers accumulate per-rank counts in buffers; the persistent
            # ones (router biases) are kept identical by construction (the one sync at init is harmless).
            self.module = DistributedDataParallel(
                model, device_ids=None if device.type == "cpu" else [device], forward_sync_buffers=False
            )

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def step(self) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self._apply()
        return norm.detach().float().cpu()
