"""Low-rank models: factorised linear layers and the low-rank SwiGLU FFN (ffn.kind 'lowrank').

The trainer calls `set_lowrank_progress(model, step / total_steps)` every step (a no-op for models
without low-rank layers); `merge_lowrank(model)` pre-merges the factors for inference.
"""

from shardyard.models.lowrank.layers import (
    LowRankLinear,
    LowRankSwiGLU,
    guide_weight,
    merge_lowrank,
    set_lowrank_progress,
)

__all__ = ["LowRankLinear", "LowRankSwiGLU", "guide_weight", "merge_lowrank", "set_lowrank_progress"]
