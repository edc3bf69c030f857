"""The model registry: `spec.model.kind` -> a builder `(ModelSpec, seq_len) -> nn.Module`.

A leaf: it imports no model code. Builder modules register themselves (`@register_model`), and the
`shardyard.models` package imports every builder module before anyone can reach this one, so
`build_model` always sees every kind.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardyard.platform.schema import ModelSpec

ModelBuilder = Callable[..., nn.Module]  # (ModelSpec, seq_len[, vocab_size=...]) -> model
MODEL_REGISTRY: dict[str, ModelBuilder] = {}
ANY_VOCAB: set[str] = set()  # kinds whose builder takes vocab_size (token models); the others read bytes
BYTE_VOCAB = 256


def register_model(kind: str, any_vocab: bool = False) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODEL_REGISTRY[kind] = fn
        if any_vocab:
            ANY_VOCAB.add(kind)
        return fn

    return wrap


def build_model(
    spec: ModelSpec, seq_len: int, vocab_size: int = BYTE_VOCAB, materialize: Callable[[int], bool] | None = None
) -> nn.Module:
    """The model for `spec`; `vocab_size` comes from data.tokenizer (256 = bytes). `materialize`
    (flat models: a pipeline rank's blocks): the blocks it rejects are built on the meta device, the
    others with the values the whole model would give them."""
    try:
        builder = MODEL_REGISTRY[spec.kind]
    except KeyError:
        raise ValueError(f"unknown model kind {spec.kind!r}; registered: {sorted(MODEL_REGISTRY)}") from None
    if materialize is not None:
        return builder(spec, seq_len, vocab_size=vocab_size, materialize=materialize)
    if spec.kind in ANY_VOCAB:
        return builder(spec, seq_len, vocab_size=vocab_size)
    if vocab_size != BYTE_VOCAB:
        raise ValueError(f"model kind {spec.kind!r} reads bytes (vocabulary 256), not {vocab_size} tokens")
    return builder(spec, seq_len)
