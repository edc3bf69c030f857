"""The token dispatcher: how the MoE layer's routed tokens reach the experts and come back.

Every MoE layer calls its dispatcher, always:

    out = dispatcher(tokens, token_of, weight_of, offsets, num_tokens, experts)   # [T, width]

with assignments grouped by global expert (`token_of`, `weight_of`, `offsets` cumulative row ends
over all E experts) and `experts` the layer's own experts module (on an expert-parallel rank: its
E/ep shard). `LocalDispatcher` (one rank holds every expert, nothing travels) is what a layer is
built with; `parallelize` wires an expert-parallel or compressed dispatcher (comm/token_dispatch.py:
one transport -- flat, hierarchical, leader or local -- and the dedup, LSH and wire-codec stages)
from the spec before training starts. Dispatchers keep their accounting in their own buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from shardyard.models.moe.permute import gather_rows, weighted_sum


class TokenDispatcher(nn.Module):
    """The interface (see the module docstring)."""

    def forward(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        num_tokens: int,
        experts: nn.Module,
    ) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """Expert parallelism of one: gather rows by expert, one grouped GEMM, weighted un-permute."""

    def forward(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        num_tokens: int,
        experts: nn.Module,
    ) -> torch.Tensor:
        return weighted_sum(experts(gather_rows(tokens, token_of), offsets), weight_of, token_of, num_tokens)
