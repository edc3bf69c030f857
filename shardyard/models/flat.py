"""Registry builders for the flat byte transformers: kinds `dense` and `moe`."""

from __future__ import annotations

from torch import nn

from shardyard.models.ffn import build_ffn_factory
from shardyard.models.registry import register_model
from shardyard.models.transformer import ByteTransformerLM
from shardyard.platform.schema import ModelSpec


@register_model("dense", any_vocab=True)
@register_model("moe", any_vocab=True)
def build_transformer(spec: ModelSpec, seq_len: int, vocab_size: int = 256) -> nn.Module:
    moe = spec.moe if spec.kind == "moe" else None
    return ByteTransformerLM(
        spec.width,
        spec.depth,
        spec.heads,
        build_ffn_factory(spec, spec.width, spec.ffn_hidden, moe),
        seq_len,
        vocab_size,
    )
