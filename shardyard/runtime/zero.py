"""DeepSpeed ZeRO for `parallel.zero: 1 | 2 | 3`: the engine replaces DDP, clipping and the optimizer
step; its checkpoint files (one optimizer partition per rank) sit beside our own state file.

DeepSpeed is an optional extra (`pip install 'shardyard[deepspeed]'`); on CPU its accelerator builds a
shared-memory comm op on first use (~40 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec

ENGINE_TAG = "deepspeed"


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """Our optimizer and schedule stay ours; DeepSpeed partitions their state and clips gradients."""
    return {
        "train_micro_batch_size_per_gpu": spec.training.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": {"stage": spec.parallel.zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(spec: JobSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler):
    try:
        import deepspeed
    except ImportError:
        raise UserError("parallel.zero needs DeepSpeed on the workers: pip install 'shardyard[deepspeed]'") from None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec), dist_init_required=False)
    return engine


def save_engine(engine, directory: Path) -> None:
    """Collective: every rank writes its partition under directory/deepspeed/."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)


def load_engine(engine, directory: Path) -> None:
    path, _ = engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
    if path is None:
        raise RuntimeError(f"{directory}: no DeepSpeed engine state (was the job started without parallel.zero?)")
