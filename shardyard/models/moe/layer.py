"""The MoE feed-forward layer: route -> sort tokens by expert -> grouped GEMM experts -> weighted un-sort.

Dropless by default (every routed token is computed); with `capacity_factor` set, each expert keeps
at most ceil(capacity_factor * tokens * k / E) assignments and the rest are dropped (the token's
residual path carries it), as in the classic capacity-based systems.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardyard.models.moe.experts import GroupedExperts
from shardyard.models.moe.router import build_router


class MoELayer(nn.Module):
    def __init__(self, width: int, hidden: int, num_experts: int, top_k: int,
                 router: str = "softmax_topk", aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, capacity_factor: float | None = None,
                 backend: str = "auto", expert_kind: str = "swiglu", jitter: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.capacity_factor = capacity_factor
        self.router = build_router(router, width, num_experts, top_k, jitter)
        self.experts = GroupedExperts(num_experts, width, hidden, expert_kind, backend)
        # Filled by forward; read by the trainer for the loss and for tracking.
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        num_tokens, k = routing.expert_ids.shape

        flat_expert = routing.expert_ids.reshape(-1)  # assignment a = token * k + slot
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        if self.capacity_factor is not None:
            order, counts = self._drop_over_capacity(order, counts, num_tokens * k)
        token_of = order // k

        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        expert_out = self.experts(tokens[token_of], offsets)
        expert_out = expert_out * routing.weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(tokens).index_add_(0, token_of, expert_out)

        self.aux_loss = (self.aux_loss_weight * routing.balance_loss
                         + self.z_loss_weight * routing.z_loss)
        self.stats = {
            "balance_loss": routing.balance_loss.detach(),
            "z_loss": routing.z_loss.detach(),
            "tokens_per_expert": counts.detach(),
            "dropped_fraction": torch.tensor(1.0 - counts.sum().item() / (num_tokens * k)),
        }
        return out.view(shape)

    def _drop_over_capacity(self, order: torch.Tensor, counts: torch.Tensor, assignments: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = math.ceil(self.capacity_factor * assignments / self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        expert_of_sorted = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_of_sorted]
        keep = rank_in_expert < capacity
        return order[keep], counts.clamp(max=capacity)
