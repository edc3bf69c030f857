"""Model registry: `build_model(spec.model, seq_len)` by `model.kind`.

Every model maps byte ids [B, T] (and optional targets [B, T]) to (logits [B, T, 256], mean
cross-entropy in nats or None). MoE layers inside expose `aux_loss` and `stats` after each
forward; `moe_layers(model)` finds them for the trainer.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from shardyard.models.moe.layer import MoELayer
from shardyard.models.transformer import ByteTransformerLM, GeluMLP, SwiGLU
from shardyard.platform.schema import ModelSpec, MoESpec

ModelBuilder = Callable[[ModelSpec, int], nn.Module]
MODEL_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(kind: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODEL_REGISTRY[kind] = fn
        return fn
    return wrap


def build_dense_ffn(spec: ModelSpec, width: int, hidden: int) -> nn.Module:
    """The dense feed-forward sub-layer of kind spec.ffn.kind at the given width and hidden size."""
    if spec.ffn.kind == "swiglu":
        return SwiGLU(width, hidden)
    if spec.ffn.kind == "gelu":
        return GeluMLP(width, hidden)
    if spec.ffn.kind == "lowrank":
        from shardyard.models.lowrank import LowRankSwiGLU
        return LowRankSwiGLU(width, hidden, spec.ffn.rank, self_guided=spec.ffn.self_guided)
    raise ValueError(f"unknown ffn kind {spec.ffn.kind!r}")


def build_moe_layer(moe: MoESpec, width: int, hidden: int) -> MoELayer:
    return MoELayer(width, hidden, moe.num_experts, moe.top_k, moe.router, moe.aux_loss, moe.z_loss,
                    moe.capacity_factor, moe.backend, moe.expert_kind, moe.jitter, moe.shared_expert,
                    moe.bias_update_rate)


def build_ffn_factory(spec: ModelSpec, width: int, hidden: int, moe: MoESpec | None) -> Callable[[int], nn.Module]:
    """Block index -> FFN module: MoE on every `moe.every`-th block when `moe` is set, dense elsewhere."""
    def make(layer: int) -> nn.Module:
        if moe is not None and (layer + 1) % moe.every == 0:
            return build_moe_layer(moe, width, hidden)
        return build_dense_ffn(spec, width, hidden)
    return make


@register_model("dense")
@register_model("moe")
def build_transformer(spec: ModelSpec, seq_len: int) -> nn.Module:
    moe = spec.moe if spec.kind == "moe" else None
    return ByteTransformerLM(spec.width, spec.depth, spec.heads,
                             build_ffn_factory(spec, spec.width, spec.ffn_hidden, moe), seq_len)


def build_model(spec: ModelSpec, seq_len: int) -> nn.Module:
    try:
        builder = MODEL_REGISTRY[spec.kind]
    except KeyError:
        raise ValueError(f"unknown model kind {spec.kind!r}; registered: {sorted(MODEL_REGISTRY)}") from None
    return builder(spec, seq_len)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total parameters, active parameters per token): an MoE layer activates top_k of E experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        inactive += expert_params * (layer.num_experts - layer.top_k) // layer.num_experts
    return total, total - inactive
import shardyard.models.bytes  # noqa: E402,F401  (registers megabyte, multiscale)
