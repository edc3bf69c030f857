"""DeepSpeed ZeRO for `parallel.zero: 1 | 2 | 3`, the one module that knows DeepSpeed.

`DeepSpeedTraining` is both the gradient step (the engine replaces DDP, clipping and the optimizer
step) and the training state (step.GradientStep and state.TrainingState). Its checkpoint is
DeepSpeed's own (one optimizer partition per rank, written by every rank under directory/deepspeed/),
so a ZeRO run resumes at the same number of workers only; `shardyard export` consolidates it
(`consolidated_weights`). Use `parallel.shard` (FSDP2) for resharding checkpoints and for expert
parallelism.

DeepSpeed is an optional extra (`pip install 'shardyard[deepspeed]'`); on CPU its accelerator builds a
shared-memory comm op on first use (~40 s, cached in ~/.cache/torch_extensions). Its partitions are
unpickled with weights_only=False, so every `*.pt` is checked first against torch's weights-only
allow-list plus DeepSpeed's own state classes (safe_load.check_torch_files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.state import TrainingState, checkpoint_format
from shardyard.runtime.parallel.step import GradientStep
from shardyard.runtime.safe_load import check_torch_files

ENGINE_TAG = "deepspeed"
FORMAT = "deepspeed"  # the state format (checkpoint layout "format") and the directory it writes


def deepspeed_config(spec: JobSpec, workers: int) -> dict[str, Any]:
    """Our optimizer and schedule stay ours; DeepSpeed partitions their state and clips gradients."""
    micro, accum = spec.batch_layout(workers)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": {"stage": spec.parallel.zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _safe_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_partitions(directory: Path) -> None:
    """Refuse (UnsafeCheckpoint) partitions that need more than plain tensors and DeepSpeed's state classes."""
    check_torch_files(Path(directory) / FORMAT, _safe_classes())


class DeepSpeedTraining(GradientStep, TrainingState):
    def __init__(self, spec: JobSpec, model, optimizer, scheduler, dims: ParallelDims) -> None:
        super().__init__(optimizer, scheduler)
        try:
            import deepspeed
        except ImportError:
            raise UserError(
                "parallel.zero needs DeepSpeed on the workers: pip install 'shardyard[deepspeed]'"
            ) from None
        self.dims = dims
        self.stage = spec.parallel.zero
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, dims.dp),
            dist_init_required=False,
        )
        self.module = self.engine

    # ------------------------------------------------------------------------------ gradient step
    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides each micro-batch's loss by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies only at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm), dtype=torch.float32)

    # ------------------------------------------------------------------------------ state
    def layout(self) -> dict[str, Any]:
        return {"format": FORMAT, "world": self.dims.world_size, "zero": self.stage}

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its partition under directory/deepspeed/."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG)

    def load(self, directory: Path, layout: dict[str, Any]) -> None:
        if checkpoint_format(layout) != FORMAT or layout.get("world") != self.dims.world_size:
            raise RuntimeError(
                f"{directory}: a DeepSpeed ZeRO job resumes only its own checkpoints at the same "
                f"number of workers (checkpoint layout {layout}, this job {self.layout()})"
            )
        check_partitions(directory)
        path, _ = self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed engine state (was the job started without parallel.zero?)")


def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO checkpoint, merged from its partitions (single process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_partitions(directory)
    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=ENGINE_TAG)
