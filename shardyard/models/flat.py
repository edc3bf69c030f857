"""Registry builders for the flat byte transformers: kinds `dense` and `moe`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardyard.models.ffn import build_ffn_factory
from shardyard.models.registry import register_model
from shardyard.models.transformer import AttnOptions, ByteTransformerLM, RopeScaling
from shardyard.platform.schema import ModelSpec


@register_model("dense", any_vocab=True)
@register_model("moe", any_vocab=True)
def build_transformer(
    spec: ModelSpec, seq_len: int, vocab_size: int = 256, materialize: Callable[[int], bool] | None = None
) -> nn.Module:
    moe = spec.moe if spec.kind == "moe" else None
    return ByteTransformerLM(
        spec.width,
        spec.depth,
        spec.heads,
        build_ffn_factory(spec, spec.width, spec.ffn_hidden, moe),
        seq_len,
        vocab_size,
        attn_options(spec),
        spec.tie_embeddings,
        materialize,
    )


def attn_options(spec: ModelSpec) -> AttnOptions:
    """The attention and norm options of a flat model's spec."""
    scaling = None
    if spec.rope_scaling is not None:
        r = spec.rope_scaling
        scaling = RopeScaling(r.factor, r.low_freq_factor, r.high_freq_factor, r.original_context)
    return AttnOptions(
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        rope_theta=spec.rope_theta,
        rope_scaling=scaling,
        norm_eps=spec.norm_eps,
        qk_norm=spec.qk_norm,
        qkv_bias=spec.qkv_bias,
    )
