"""Routers: pick (token, expert) assignments and say how much each weighs.

Every router returns a `Routing`: flat assignment lists (token id, expert id, weight), plus the
auxiliary losses it wants optimised (load balancing, router z-loss), unweighted; the layer weights them.

- `softmax_topk`: softmax over experts, top-k per token, kept probabilities renormalised (Mixtral).
- `switch`: top-1, raw probability as the weight (Switch Transformer).
- `aux_free`: like softmax_topk, but a per-expert bias is added to the scores for *selection only*;
  the bias moves toward balance once per optimizer step (DeepSeek-V3's auxiliary-loss-free
  balancing; `layer.update_router_biases`, an optimizer pre-step hook). The bias is a buffer (saved in
  checkpoints) moved by the load summed over all data-parallel ranks, so every replica keeps the same bias.
- `expert_choice`: each expert picks its top-C tokens (C = capacity_factor * T * k / E); balanced by
  construction, but a token may get no expert, and the choice looks at the whole batch (non-causal).

Token-choice options: `score` softmax (default) or sigmoid (DeepSeek-V3: independent per-expert
scores; top-k and the aux_free bias act on them, the losses see them normalised to sum 1);
`renormalize` the kept weights (default: all but switch); `routed_scale` multiplies the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("softmax_topk", "switch", "aux_free", "expert_choice")
SCORES = ("softmax", "sigmoid")


@dataclass
class Routing:
    token_ids: torch.Tensor  # [A] int64: the token of each assignment
    expert_ids: torch.Tensor  # [A] int64: its expert
    weights: torch.Tensor  # [A] float, the input dtype: its combine weight
    balance_loss: torch.Tensor  # scalar; Switch-style E * sum_e f_e * P_e (1.0 when perfectly balanced)
    balance_counts: torch.Tensor  # [E]: the assignments per expert the balance loss's f_e come from
    mean_probs: torch.Tensor  # [E]: P_e, the mean router probability of each expert (differentiable)
    z_loss: torch.Tensor  # scalar; mean(logsumexp(logits)^2)
    sorted_by_expert: bool = False  # assignments already grouped by expert (expert choice)
    entropy: torch.Tensor | None = None  # scalar, detached: mean per-token entropy of the router (nats)


@torch.library.custom_op("shardyard::expert_counts", mutates_args=())
def _expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(expert_ids, minlength=num_experts)


@_expert_counts.register_fake
def _(expert_ids, num_experts):  # noqa: ANN001, ANN202
    return expert_ids.new_empty(num_experts)


EXPERT_COUNTS_OP = torch.ops.shardyard.expert_counts.default  # what dispatch modes see (optim.meta_step)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 assignments per expert (ids in [0, E)). bincount as an operator whose output shape
    torch.compile knows (E), where bincount's own shape depends on the largest id."""
    return _expert_counts(expert_ids, num_experts)


@torch.no_grad()
def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the routing distribution's entropy: ln(E) = undecided, 0 = one expert."""
    return -(probs.float() * probs.float().clamp_min(1e-30).log()).sum(-1).mean()


class LocalTokens:
    """Where the tokens a router sees come from: all of the batch it balances over (here: this rank's).
    Parallelism that splits one batch's tokens over ranks (tensor parallelism's sequence split) gives
    the router a group whose `mean` averages over them, so its losses stay those of the whole batch."""

    def mean(self, local: torch.Tensor) -> torch.Tensor:
        """The mean over the group of a per-rank mean (equal token counts per rank)."""
        return local


def balance_from_counts(mean_probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer aux loss: E * sum_e f_e * P_e, f_e = counts_e / sum(counts) the fraction of
    assignments to e, P_e its mean router probability. The counts may be this micro-batch's or the whole
    optimizer step's (the global balance loss); the gradient flows through P only."""
    fraction = counts.to(mean_probs.dtype) / counts.sum().clamp(min=1)
    return mean_probs.shape[-1] * torch.sum(fraction * mean_probs)


class _RouterBase(nn.Module):
    def __init__(self, width: int, num_experts: int, top_k: int, jitter: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = jitter
        self.gate = nn.Linear(width, num_experts, bias=False)
        self.token_group = LocalTokens()  # parallelize sets the group when one batch's tokens are split

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return self.gate(x).float()


class TopKRouter(_RouterBase):
    """Token choice: every token picks top_k experts (`softmax_topk`, `switch`, `aux_free`)."""

    def __init__(
        self,
        width: int,
        num_experts: int,
        top_k: int,
        kind: str = "softmax_topk",
        jitter: float = 0.0,
        bias_update_rate: float = 1e-3,
        score: str = "softmax",
        renormalize: bool | None = None,
        routed_scale: float = 1.0,
    ) -> None:
        super().__init__(width, num_experts, top_k, jitter)
        if kind == "switch" and top_k != 1:
            raise ValueError("the switch router is top-1")
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must not exceed num_experts ({num_experts})")
        if score not in SCORES:
            raise ValueError(f"unknown router score {score!r}; available: {', '.join(SCORES)}")
        self.kind = kind
        self.bias_update_rate = bias_update_rate
        self.score = score
        self.renormalize = kind != "switch" if renormalize is None else renormalize
        self.routed_scale = routed_scale
        # Selection-only bias for aux_free balancing; a buffer so checkpoints carry it.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=(kind == "aux_free"))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        if self.score == "sigmoid":  # independent per-expert scores; normalised only for the losses
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = probs = F.softmax(logits, dim=-1)
        if self.kind == "aux_free":
            _, expert_ids = (scores + self.expert_bias).topk(self.top_k, dim=-1)
            top_probs = scores.gather(-1, expert_ids)
        else:
            top_probs, expert_ids = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        if self.routed_scale != 1.0:
            top_probs = top_probs * self.routed_scale
        flat_experts = expert_ids.reshape(-1)
        counts = expert_counts(flat_experts, self.num_experts)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        mean_probs = self.token_group.mean(probs.mean(dim=0))
        return Routing(
            token_ids=tokens,
            expert_ids=flat_experts,
            weights=top_probs.reshape(-1).to(x.dtype),
            balance_loss=balance_from_counts(mean_probs, self.token_group.mean(counts.float())),
            balance_counts=counts,
            mean_probs=mean_probs,
            z_loss=self.token_group.mean(torch.logsumexp(logits, dim=-1).square().mean()),
            entropy=self.token_group.mean(mean_entropy(probs)),
        )

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """bias_e += rate * sign(mean load - load_e); `load` is the step's count summed over ranks."""
        load = load.to(self.expert_bias.dtype)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


class ExpertChoiceRouter(_RouterBase):
    """Expert choice (Zhou et al. 2022): expert e takes the C tokens with the highest score for e."""

    def __init__(
        self,
        width: int,
        num_experts: int,
        top_k: int,
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        routed_scale: float = 1.0,
    ) -> None:
        super().__init__(width, num_experts, top_k, jitter)
        self.capacity_factor = capacity_factor or 1.0
        self.routed_scale = routed_scale

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = F.softmax(logits, dim=-1)
        c = self.capacity(x.shape[0])
        weights, tokens = probs.t().topk(c, dim=-1)  # [E, C] each
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale
        experts = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        counts = torch.full((self.num_experts,), c, device=x.device)
        mean_probs = self.token_group.mean(probs.mean(dim=0))
        return Routing(
            token_ids=tokens.reshape(-1),
            expert_ids=experts,
            weights=weights.reshape(-1).to(x.dtype),
            balance_loss=balance_from_counts(mean_probs, self.token_group.mean(counts.float())),
            balance_counts=counts,
            mean_probs=mean_probs,
            z_loss=self.token_group.mean(torch.logsumexp(logits, dim=-1).square().mean()),
            sorted_by_expert=True,
            entropy=self.token_group.mean(mean_entropy(probs)),
        )


def build_router(
    kind: str,
    width: int,
    num_experts: int,
    top_k: int,
    jitter: float = 0.0,
    capacity_factor: float | None = None,
    bias_update_rate: float = 1e-3,
    score: str = "softmax",
    renormalize: bool | None = None,
    routed_scale: float = 1.0,
) -> nn.Module:
    if kind == "expert_choice":
        if score != "softmax" or renormalize:
            raise ValueError("the expert_choice router scores with a softmax over experts and never renormalises")
        return ExpertChoiceRouter(width, num_experts, top_k, jitter, capacity_factor, routed_scale)
    if kind in ROUTERS:
        return TopKRouter(width, num_experts, top_k, kind, jitter, bias_update_rate, score, renormalize, routed_scale)
    raise ValueError(f"unknown router {kind!r}; available: {list(ROUTERS)}")
