"""Hierarchical byte models: registry builders for kinds `megabyte` and `multiscale`.

`spec.stages` lists the stages global first; each stage has its own width, depth, heads, patch size,
feed-forward (dense, or MoE when `stage.moe` is set) and checkpoint chunks.
"""

from __future__ import annotations

from torch import nn

from shardyard.models.bytes.generate import generate, generate_from_checkpoint
from shardyard.models.bytes.megabyte import MegabyteLM
from shardyard.models.bytes.multiscale import MultiscaleByteLM, StageDims
from shardyard.models.ffn import build_ffn_factory
from shardyard.models.registry import register_model
from shardyard.platform.errors import UserError
from shardyard.platform.schema import ModelSpec, StageSpec

__all__ = ["MegabyteLM", "MultiscaleByteLM", "StageDims", "build_byte_model", "generate", "generate_from_checkpoint"]


def stage_dims(stage: StageSpec) -> StageDims:
    return StageDims(stage.width, stage.depth, stage.heads, stage.patch_size, stage.checkpoint_chunks)


@register_model("megabyte")
@register_model("multiscale")
def build_byte_model(spec: ModelSpec, seq_len: int) -> nn.Module:
    """seq_len may be anything up to the context (product of patch sizes); shorter sequences are
    padded at the end to a whole number of global patches, never to the full context."""
    problem = spec.seq_len_problem(seq_len)
    if problem:
        raise UserError(problem)
    stages = spec.stages or []
    dims = [stage_dims(s) for s in stages]
    ffns = [build_ffn_factory(spec, s.width, s.hidden, s.moe) for s in stages]
    if spec.kind == "megabyte":
        return MegabyteLM(dims[0], dims[1], ffns[0], ffns[1])
    return MultiscaleByteLM(dims, ffns)
