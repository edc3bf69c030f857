"""DeepSpeed ZeRO for `parallel.zero: 1 | 2 | 3`: the engine replaces DDP, clipping and the optimizer
step. Its checkpoint is DeepSpeed's own (one optimizer partition per rank, written by every rank),
so a ZeRO run resumes at the same number of workers only; `shardyard export` consolidates it.
Use `parallel.shard` (FSDP2) for resharding checkpoints and for expert parallelism.

DeepSpeed is an optional extra (`pip install 'shardyard[deepspeed]'`); on CPU its accelerator builds a
shared-memory comm op on first use (~40 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec
from shardyard.runtime.parallel.base import ParallelPlan

ENGINE_TAG = "deepspeed"


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """Our optimizer and schedule stay ours; DeepSpeed partitions their state and clips gradients."""
    return {
        "train_micro_batch_size_per_gpu": spec.training.batch_size,
        "gradient_accumulation_steps": spec.training.grad_accum,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": {"stage": spec.parallel.zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedPlan(ParallelPlan):
    name = "deepspeed"

    def __init__(self, spec: JobSpec, model, optimizer, scheduler) -> None:
        super().__init__(model, optimizer, scheduler, spec.optim.grad_clip)
        try:
            import deepspeed
        except ImportError:
            raise UserError(
                "parallel.zero needs DeepSpeed on the workers: pip install 'shardyard[deepspeed]'"
            ) from None
        self.stage = spec.parallel.zero
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec),
            dist_init_required=False,
        )
        self.module = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides each micro-batch's loss by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies only at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm), dtype=torch.float32)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "mode": "deepspeed", "zero": self.stage}

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its partition under directory/deepspeed/."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed engine state (was the job started without parallel.zero?)")


def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO checkpoint, merged from its partitions (single process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=ENGINE_TAG)
