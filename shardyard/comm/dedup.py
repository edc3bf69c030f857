"""The deduplication stage of expert dispatch: one copy of a token per destination EP rank.

With top-k > 1 a token often goes to several experts of the same EP rank. Instead of k copies, the
sender sends the token once per destination rank together with a small table of (local expert,
router weight) slots; the receiver fans the row out to its experts, weights their outputs and sums
them, and only that sum makes the return trip (DeepEP-style).

Exactness: rows keep today's order inside every expert (source rank, then token), and the weighted
sum uses the MoE layer's own `permute.weighted_sum` and `gather_rows`, so every expert sees the same rows and
every product is the same. Summing on the receiving side fixes the association of each token's k-term
sums (its output, and its input gradient): the terms of one destination rank first, in expert order,
then the ranks in rank order. The expert-parallel path without dedup
(`TransportDispatcher._rank_associated`) sums in that same association, so dedup on and off are
bit-identical, outputs and every gradient (tested on 4 gloo ranks and on one worker); against a plain
left-to-right sum over all k terms they differ by a few ulps of re-association.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardyard.models.moe.permute import gather_rows, weighted_sum


@dataclass
class UniqueRows:
    """Sender side: which token goes to which rank, once."""

    token: torch.Tensor  # [U] token of every unique row, grouped by destination rank, tokens ascending
    send_counts: torch.Tensor  # [P] unique rows per destination rank
    meta: torch.Tensor  # [U, 2 * slots] fp32: router weights (differentiable), then local expert ids (-1 = none)


def dedup_rows(
    token_of: torch.Tensor,
    weight_of: torch.Tensor,
    expert_counts: torch.Tensor,
    num_tokens: int,
    ep_size: int,
    slots: int,
) -> UniqueRows:
    """token_of / weight_of [A]: assignments grouped by global expert (expert_counts [E] each)."""
    device, num_experts = token_of.device, expert_counts.numel()
    per_rank = num_experts // ep_size
    expert_of = torch.repeat_interleave(
        torch.arange(num_experts, device=device), expert_counts.to(device), output_size=token_of.numel()
    )
    dest = expert_of // per_rank
    unique_key, inverse = torch.unique(dest * num_tokens + token_of, return_inverse=True)
    u = unique_key.numel()
    # slot of each assignment within its unique row: its rank among that row's assignments (expert order)
    order = torch.argsort(inverse, stable=True)
    per_row = torch.bincount(inverse, minlength=u)
    starts = torch.cumsum(per_row, 0) - per_row
    slot = torch.empty_like(inverse)
    slot[order] = torch.arange(inverse.numel(), device=device) - starts[inverse[order]]
    if u and int(per_row.max()) > slots:
        raise ValueError(f"a token goes to {int(per_row.max())} experts of one rank but only {slots} slots exist")
    flat = inverse * slots + slot
    weights = torch.zeros(u * slots, dtype=torch.float32, device=device).index_put((flat,), weight_of.float())
    experts = torch.full((u * slots,), -1.0, device=device).index_put_((flat,), (expert_of % per_rank).float())
    meta = torch.cat([weights.view(u, slots), experts.view(u, slots)], dim=1)
    return UniqueRows(unique_key % num_tokens, torch.bincount(unique_key // num_tokens, minlength=ep_size), meta)


def fan_out_and_sum(
    rows: torch.Tensor, meta: torch.Tensor, experts: torch.nn.Module, experts_per_rank: int
) -> tuple[torch.Tensor, int]:
    """Receiver side: run every row through its experts, return sum_slots weight * E(row) per row, and
    the number of expert rows computed."""
    slots = meta.shape[1] // 2
    weights, expert_ids = meta[:, :slots], meta[:, slots:].detach().to(torch.int64)
    row_idx, slot_idx = torch.nonzero(expert_ids >= 0, as_tuple=True)
    local_expert = expert_ids[row_idx, slot_idx]
    order = torch.argsort(local_expert * max(rows.shape[0], 1) + row_idx)  # (expert, source, token)
    row_idx, slot_idx, local_expert = row_idx[order], slot_idx[order], local_expert[order]
    offsets = torch.cumsum(torch.bincount(local_expert, minlength=experts_per_rank), 0).to(torch.int32)
    out = experts(gather_rows(rows, row_idx), offsets)
    return weighted_sum(out, weights[row_idx, slot_idx].to(out.dtype), row_idx, rows.shape[0]), int(row_idx.numel())


def scatter_to_tokens(summed: torch.Tensor, unique: UniqueRows, num_tokens: int) -> torch.Tensor:
    """Sender side, after the return trip: out[t] = sum over destination ranks (in rank order)."""
    return summed.new_zeros(num_tokens, summed.shape[1]).index_add(0, unique.token, summed)
