"""Feed-forward sub-layers from the spec: dense (spec.ffn.kind) or MoE (a MoESpec), per block index."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardyard.models.lowrank import LowRankSwiGLU
from shardyard.models.moe.layer import MoELayer
from shardyard.models.transformer import dense_mlp
from shardyard.platform.schema import ModelSpec, MoESpec


def build_dense_ffn(spec: ModelSpec, width: int, hidden: int) -> nn.Module:
    """The dense feed-forward sub-layer of kind spec.ffn.kind at the given width and hidden size."""
    if spec.ffn.kind == "lowrank":
        return LowRankSwiGLU(width, hidden, spec.ffn.rank, self_guided=spec.ffn.self_guided)
    return dense_mlp(spec.ffn.kind, width, hidden)


def build_moe_layer(moe: MoESpec, width: int, hidden: int) -> MoELayer:
    """An MoE layer; `hidden` is the dense FFN's, which experts use unless moe.expert_hidden is set."""
    expert_hidden = moe.expert_hidden or hidden
    return MoELayer(
        width=width,
        hidden=expert_hidden,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        router=moe.router,
        aux_loss_weight=moe.aux_loss,
        z_loss_weight=moe.z_loss,
        capacity_factor=moe.capacity_factor,
        backend=moe.backend,
        expert_kind=moe.expert_kind,
        jitter=moe.jitter,
        shared_expert=moe.num_shared > 0,
        bias_update_rate=moe.bias_update_rate,
        shared_hidden=moe.num_shared * (moe.shared_hidden or expert_hidden),
        shared_gate=moe.shared_gate,
        score=moe.score,
        renormalize=moe.renormalize,
        routed_scale=moe.routed_scale,
    )


def build_ffn_factory(spec: ModelSpec, width: int, hidden: int, moe: MoESpec | None) -> Callable[[int], nn.Module]:
    """Block index -> FFN module: MoE on every `moe.every`-th block past `moe.first_dense_layers` when
    `moe` is set, dense elsewhere."""

    def make(layer: int) -> nn.Module:
        if moe is not None and moe.is_moe_block(layer):
            return build_moe_layer(moe, width, hidden)
        return build_dense_ffn(spec, width, hidden)

    return make
