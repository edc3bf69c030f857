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
import torch.distributed as dist
from torch import nn

from shardyard.models.moe.accounting import AttachAuxLoss, StepStatistics, aux_weight, balance_mode
from shardyard.models.moe.dispatcher import LocalDispatcher, TokenDispatcher
from shardyard.models.moe.experts import GroupedExperts, SharedExpert
from shardyard.models.moe.router import Routing, TopKRouter, balance_from_counts, build_router, expert_counts

STEP_STATS = ("tokens_per_expert", "aux_loss", "balance_loss", "z_loss", "dropped", "routed", "entropy", "weight")


class MoELayer(StepStatistics, nn.Module):
    step_stat_names = STEP_STATS

    def __init__(
        self,
        width: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        router: str = "softmax_topk",
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        capacity_factor: float | None = None,
        backend: str = "auto",
        expert_kind: str = "swiglu",
        jitter: float = 0.0,
        shared_expert: bool = False,
        bias_update_rate: float = 1e-3,
        shared_hidden: int | None = None,
        shared_gate: bool = False,
        score: str = "softmax",
        renormalize: bool | None = None,
        routed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.capacity_factor = capacity_factor
        self.router = build_router(
            router,
            width,
            num_experts,
            top_k,
            jitter,
            capacity_factor,
            bias_update_rate,
            score,
            renormalize,
            routed_scale,
        )
        self.experts = GroupedExperts(num_experts, width, hidden, expert_kind, backend)
        # Tokens reach the experts through a dispatcher, always (local here; parallelize wires
        # expert parallelism and the compressed dispatch stages, see dispatcher.py).
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        # Shared experts: one dense MLP (n shared experts of hidden h = one of hidden n*h), optionally
        # scaled per token by sigmoid(x . w) (Qwen2-MoE's shared_expert_gate).
        self.shared_expert = SharedExpert(width, shared_hidden or hidden, expert_kind) if shared_expert else None
        self.shared_gate = nn.Linear(width, 1, bias=False) if shared_expert and shared_gate else None
        # Accumulated over the optimizer step (micro-batches and checkpoint chunks; a recompute is
        # taken back out by accounting.checkpointed); the trainer reads and resets them with
        # take_step_stats(). Not persistent: a checkpoint is taken between steps, when they are zero.
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        for name in STEP_STATS[1:]:
            self.register_buffer(name, torch.zeros((), dtype=torch.float64), persistent=False)
        # The optimizer step's assignments per expert over every micro-batch and data-parallel rank, for
        # the global balance loss (filled by a counting pre-pass, see accounting.py).
        self.register_buffer("balance_counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)

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

        counts = expert_counts(routing.expert_ids, self.num_experts)
        kept = counts
        if routing.sorted_by_expert:
            token_of, weight_of = routing.token_ids, routing.weights
        else:
            order = torch.argsort(routing.expert_ids, stable=True)  # assignments grouped by expert
            if self.capacity_factor is not None:
                order, kept = self._drop_over_capacity(order, counts, assignments)
            token_of, weight_of = routing.token_ids[order], routing.weights[order]

        offsets = torch.cumsum(kept, dim=0).to(torch.int32)
        out = self.dispatcher(tokens, token_of, weight_of, offsets, num_tokens, self.experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared

        mode = balance_mode()
        if mode == "count":  # the counting pre-pass of the global balance loss: no loss, no accounting
            self.balance_counts += routing.balance_counts.to(self.balance_counts)
            return out.view(shape)
        balance = routing.balance_loss
        if mode == "global":  # f_e over the whole optimizer step, P_e over this micro-batch
            balance = balance_from_counts(routing.mean_probs, self.balance_counts)
            routing.balance_loss = balance
        aux = self.aux_loss_weight * balance + self.z_loss_weight * routing.z_loss
        weight = aux_weight()
        if self.training and torch.is_grad_enabled() and aux.requires_grad:
            out = AttachAuxLoss.apply(out, aux, weight)
        self._accumulate(routing, aux, kept, token_of, num_tokens, assignments, weight)
        return out.view(shape)

    @torch.no_grad()
    def _accumulate(
        self,
        routing: Routing,
        aux: torch.Tensor,
        kept: torch.Tensor,
        token_of: torch.Tensor,
        num_tokens: int,
        assignments: int,
        weight: float,
    ) -> None:
        self.tokens_per_expert += kept.to(self.tokens_per_expert)
        self.aux_loss += weight * aux.detach().double()
        self.balance_loss += weight * routing.balance_loss.detach().double()
        self.z_loss += weight * routing.z_loss.detach().double()
        if routing.entropy is not None:
            self.entropy += weight * routing.entropy.double()
        if routing.sorted_by_expert:  # expert choice: tokens no expert took
            covered = torch.zeros(num_tokens, dtype=torch.bool, device=token_of.device)
            covered[token_of] = True
            self.dropped += num_tokens - covered.sum().double()
            self.routed += num_tokens
        else:  # token choice: assignments over capacity
            self.dropped += assignments - kept.sum().double()
            self.routed += assignments
        self.weight += weight

    @torch.no_grad()
    def take_step_stats(self) -> dict[str, torch.Tensor]:
        """This step's accounting (weighted means for the losses, sums for the counts); resets it."""
        stats = {name: getattr(self, name).clone() for name in STEP_STATS}
        for name in STEP_STATS:
            getattr(self, name).zero_()
        return stats

    def _drop_over_capacity(
        self, order: torch.Tensor, counts: torch.Tensor, assignments: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = math.ceil(self.capacity_factor * assignments / self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        expert_of_sorted = torch.repeat_interleave(
            torch.arange(self.num_experts, device=counts.device), counts, output_size=order.numel()
        )
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_of_sorted]
        keep = rank_in_expert < capacity
        return order[keep], counts.clamp(max=capacity)


@torch.no_grad()
def share_balance_counts(layers: list[MoELayer], group: dist.ProcessGroup | None = None) -> None:
    """Sum every layer's `balance_counts` (the counting pre-pass's) over `group` (the data-parallel
    ranks; None: this process's counts alone): the step-wide expert fractions of the global balance loss."""
    if not layers:
        return
    counts = torch.stack([layer.balance_counts for layer in layers])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    for layer, total in zip(layers, counts):
        layer.balance_counts.copy_(total)


@torch.no_grad()
def clear_balance_counts(layers: list[MoELayer]) -> None:
    """After the optimizer step: the next step counts afresh."""
    for layer in layers:
        layer.balance_counts.zero_()


@torch.no_grad()
def update_router_biases(layers: list[MoELayer], group: dist.ProcessGroup | None = None) -> None:
    """Aux-loss-free balancing, once per optimizer step: move each aux_free router's bias toward
    balance by the step's token counts summed over every data-parallel rank (so replicas agree).
    Collective over `group` (the data-parallel ranks; None: this process's counts alone)."""
    routers = [
        (layer, layer.router)
        for layer in layers
        if isinstance(layer.router, TopKRouter) and layer.router.kind == "aux_free"
    ]
    if not routers:
        return
    loads = torch.stack([layer.tokens_per_expert for layer, _ in routers])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
    for (_, router), load in zip(routers, loads):
        router.update_bias(load)


def attach_router_bias_updates(
    layers: list[MoELayer], optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None = None
):
    """Run `update_router_biases` as a pre-step hook of `optimizer` (before the step's stats are
    reset). Returns the hook handle, or None when no layer uses the aux_free router."""
    if not any(isinstance(layer.router, TopKRouter) and layer.router.kind == "aux_free" for layer in layers):
        return None
    return optimizer.register_step_pre_hook(lambda *_: update_router_biases(layers, group))
