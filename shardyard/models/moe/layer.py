"""The MoE feed-forward layer: route -> sort tokens by expert -> grouped GEMM experts -> weighted un-sort.

Dropless by default (every routed token is computed); with `capacity_factor` set, each expert keeps
at most ceil(capacity_factor * tokens * k / E) assignments and the rest are dropped (the token's
residual path carries it), as in the classic capacity-based systems. With the expert-choice router,
`capacity_factor` sets how many tokens each expert takes instead.

Tokens are permuted with one argsort over the flat assignment list and moved with index_select /
index_add (no Python loop over tokens); see permute.py for the fused gather/scatter used on the path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardyard.models.moe.experts import GroupedExperts, SharedExpert
from shardyard.models.moe.permute import combine, dispatch
from shardyard.models.moe.router import Routing, TopKRouter, build_router


def _inside_backward() -> bool:
    """True while the autograd engine runs (e.g. a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class MoELayer(nn.Module):
    def __init__(self, width: int, hidden: int, num_experts: int, top_k: int,
                 router: str = "softmax_topk", aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, capacity_factor: float | None = None,
                 backend: str = "auto", expert_kind: str = "swiglu", jitter: float = 0.0,
                 shared_expert: bool = False, bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.capacity_factor = capacity_factor
        self.router = build_router(router, width, num_experts, top_k, jitter, capacity_factor, bias_update_rate)
        self.experts = GroupedExperts(num_experts, width, hidden, expert_kind, backend)
        self.shared_expert = SharedExpert(width, hidden, expert_kind) if shared_expert else None
        # Filled by forward; read by the trainer for the loss and for tracking.
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}

    @property
    def backend(self) -> str:
        return self.experts.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.experts.backend = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        num_tokens = tokens.shape[0]
        routing: Routing = self.router(tokens)
        assignments = routing.expert_ids.numel()

        counts = torch.bincount(routing.expert_ids, minlength=self.num_experts)
        if (self.training and isinstance(self.router, TopKRouter) and self.router.kind == "aux_free"
                and not _inside_backward()):  # activation-checkpoint recompute must not update twice
            self.router.update_bias(counts)
        kept = counts
        if routing.sorted_by_expert:
            token_of, weight_of = routing.token_ids, routing.weights
        else:
            order = torch.argsort(routing.expert_ids, stable=True)  # assignments grouped by expert
            if self.capacity_factor is not None:
                order, kept = self._drop_over_capacity(order, counts, assignments)
            token_of, weight_of = routing.token_ids[order], routing.weights[order]

        offsets = torch.cumsum(kept, dim=0).to(torch.int32)
        expert_out = self.experts(dispatch(tokens, token_of), offsets)
        out = combine(expert_out, weight_of, token_of, num_tokens)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)

        self.aux_loss = (self.aux_loss_weight * routing.balance_loss
                         + self.z_loss_weight * routing.z_loss)
        self.stats = {
            "balance_loss": routing.balance_loss.detach(),
            "z_loss": routing.z_loss.detach(),
            "tokens_per_expert": kept.detach(),
            "dropped_fraction": self._dropped_fraction(token_of, kept, num_tokens, assignments,
                                                       routing.sorted_by_expert),
        }
        return out.view(shape)

    def _drop_over_capacity(self, order: torch.Tensor, counts: torch.Tensor, assignments: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = math.ceil(self.capacity_factor * assignments / self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        expert_of_sorted = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts,
                                                   output_size=order.numel())
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_of_sorted]
        keep = rank_in_expert < capacity
        return order[keep], counts.clamp(max=capacity)

    @staticmethod
    def _dropped_fraction(token_of: torch.Tensor, kept: torch.Tensor, num_tokens: int, assignments: int,
                          expert_choice: bool) -> torch.Tensor:
        """Token choice: share of assignments dropped. Expert choice: share of tokens no expert took."""
        if expert_choice:
            covered = torch.zeros(num_tokens, dtype=torch.bool, device=token_of.device)
            covered[token_of] = True
            return 1.0 - covered.float().mean()
        return 1.0 - kept.sum().float() / max(assignments, 1)
