"""Routers: pick experts for each token and say how much each pick weighs.

Every router returns a `Routing`: top-k expert ids and weights per token, plus the auxiliary losses
it wants optimised (load balancing, router z-loss), already unweighted; the layer applies weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [T, k] int64
    weights: torch.Tensor  # [T, k] float, same dtype as the input
    balance_loss: torch.Tensor  # scalar; Switch-style E * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar; mean(logsumexp(logits)^2)


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer aux loss: E * sum_e (fraction of assignments to e) * (mean router prob of e)."""
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / expert_ids.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


class TopKRouter(nn.Module):
    """Linear gate + softmax; top-k experts per token.

    `softmax_topk` renormalises the k kept probabilities to sum to 1 (Mixtral style);
    `switch` is top-1 and keeps the raw probability as the weight (Switch Transformer).
    """

    def __init__(self, width: int, num_experts: int, top_k: int, kind: str = "softmax_topk",
                 jitter: float = 0.0) -> None:
        super().__init__()
        if kind == "switch" and top_k != 1:
            raise ValueError("the switch router is top-1")
        self.num_experts = num_experts
        self.top_k = top_k
        self.kind = kind
        self.jitter = jitter
        self.gate = nn.Linear(width, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x).float()
        probs = F.softmax(logits, dim=-1)
        top_probs, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.kind == "softmax_topk":
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return Routing(
            expert_ids=expert_ids,
            weights=top_probs.to(x.dtype),
            balance_loss=load_balancing_loss(probs, expert_ids, self.num_experts),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
        )


ROUTERS = ("softmax_topk", "switch")


def build_router(kind: str, width: int, num_experts: int, top_k: int, jitter: float = 0.0) -> nn.Module:
    if kind in ROUTERS:
        return TopKRouter(width, num_experts, top_k, kind, jitter)
    raise ValueError(f"unknown router {kind!r}; available: {list(ROUTERS)}")
