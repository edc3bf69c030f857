"""The model registry: `spec.model.kind` -> a builder `(ModelSpec, seq_len) -> nn.Module`.

A leaf: it imports no model code. Builder modules register themselves (`@register_model`), and the
`shardyard.models` package imports every builder module before anyone can reach this one, so
`build_model` always sees every kind.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from shardyard.platform.schema import ModelSpec

ModelBuilder = Callable[[ModelSpec, int], nn.Module]
MODEL_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(kind: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODEL_REGISTRY[kind] = fn
        return fn
    return wrap


def build_model(spec: ModelSpec, seq_len: int) -> nn.Module:
    try:
        builder = MODEL_REGISTRY[spec.kind]
    except KeyError:
        raise ValueError(f"unknown model kind {spec.kind!r}; registered: {sorted(MODEL_REGISTRY)}") from None
    return builder(spec, seq_len)
