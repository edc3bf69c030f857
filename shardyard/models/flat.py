"""Registry builders for the flat byte transformers: kinds `dense` and `moe`."""

from __future__ import annotations

from torch import nn

from shardyard.models.ffn import build_ffn_factory
from shardyard.models.registry import register_model
from shardyard.models.transformer import ByteTransformerLM
from shardyard.platform.schema import ModelSpec


@register_model("dense")
@register_model("moe")
def build_transformer(spec: ModelSpec, seq_len: int) -> nn.Module:
    moe = spec.moe if spec.kind == "moe" else None
    return ByteTransformerLM(spec.width, spec.depth, spec.heads,
                             build_ffn_factory(spec, spec.width, spec.ffn_hidden, moe), seq_len)
