"""Hierarchical byte models: registry builders for kinds `megabyte` and `multiscale`.

`spec.stages` lists the stages global first; each stage has its own width, depth, heads, patch size,
feed-forward (dense, or MoE when `stage.moe` is set) and checkpoint chunks.
"""

from __future__ import annotations

from torch import nn

from shardyard.models import register_model
from shardyard.models.bytes.generate import generate, generate_from_checkpoint
from shardyard.models.bytes.megabyte import MegabyteLM
from shardyard.models.bytes.multiscale import MultiscaleByteLM, StageDims
from shardyard.models.moe.layer import MoELayer
from shardyard.models.transformer import FFNFactory, GeluMLP, SwiGLU
from shardyard.platform.errors import UserError
from shardyard.platform.schema import ModelSpec, StageSpec

__all__ = ["MegabyteLM", "MultiscaleByteLM", "StageDims", "build_byte_model", "generate",
           "generate_from_checkpoint", "stage_ffn_factory"]


def stage_ffn_factory(spec: ModelSpec, stage: StageSpec) -> FFNFactory:
    """Block index -> the stage's FFN: MoE on every `stage.moe.every`-th block, else spec.ffn.kind."""
    def make(layer: int) -> nn.Module:
        moe = stage.moe
        if moe is not None and (layer + 1) % moe.every == 0:
            return MoELayer(stage.width, stage.hidden, moe.num_experts, moe.top_k, moe.router,
                            moe.aux_loss, moe.z_loss, moe.capacity_factor, moe.backend,
                            moe.expert_kind, moe.jitter)
        if spec.ffn.kind == "swiglu":
            return SwiGLU(stage.width, stage.hidden)
        if spec.ffn.kind == "gelu":
            return GeluMLP(stage.width, stage.hidden)
        from shardyard.models.lowrank import LowRankSwiGLU  # type: ignore[attr-defined]
        return LowRankSwiGLU(stage.width, stage.hidden, spec.ffn.rank)
    return make


def stage_dims(stage: StageSpec) -> StageDims:
    return StageDims(stage.width, stage.depth, stage.heads, stage.patch_size, stage.checkpoint_chunks)


@register_model("megabyte")
@register_model("multiscale")
def build_byte_model(spec: ModelSpec, seq_len: int) -> nn.Module:
    """seq_len may be anything up to the context (product of patch sizes); shorter sequences are
    padded at the end to a whole number of global patches, never to the full context."""
    stages = spec.stages or []
    context = spec.context or 0
    if seq_len > context:
        sizes = " x ".join(str(s.patch_size) for s in stages)
        raise UserError(f"data.seq_len ({seq_len}) exceeds the {spec.kind} model's context {sizes} = {context} bytes; "
                        f"raise model.stages[0].patch_size to at least {-(-seq_len // (context // stages[0].patch_size))}")
    dims = [stage_dims(s) for s in stages]
    ffns = [stage_ffn_factory(spec, s) for s in stages]
    if spec.kind == "megabyte":
        return MegabyteLM(dims[0], dims[1], ffns[0], ffns[1])
    return MultiscaleByteLM(dims, ffns)
