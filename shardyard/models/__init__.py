"""Models: `build_model(spec.model, seq_len)` by `model.kind` (see registry.py).

Every model maps byte ids [B, T] (and optional targets [B, T]) to (logits [B, T, 256], mean
cross-entropy in nats or None). `moe_layers(model)` finds the MoE layers inside for the trainer.

Importing this package imports every builder module (flat.py: dense | moe; bytes/: megabyte |
multiscale), which registers its kinds in the registry.
"""

from __future__ import annotations

from torch import nn

from shardyard.models import bytes as _byte_models  # noqa: F401  (registers megabyte, multiscale)
from shardyard.models import flat as _flat_models  # noqa: F401  (registers dense, moe)
from shardyard.models.ffn import build_dense_ffn, build_ffn_factory, build_moe_layer
from shardyard.models.moe.layer import MoELayer
from shardyard.models.registry import MODEL_REGISTRY, build_model, register_model

__all__ = [
    "MODEL_REGISTRY",
    "build_dense_ffn",
    "build_ffn_factory",
    "build_model",
    "build_moe_layer",
    "count_parameters",
    "moe_layers",
    "register_model",
]


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
