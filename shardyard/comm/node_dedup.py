"""The node-level dedup stage: one copy of a token per destination node across the inter-node link,
then one per rank inside the node.

Hop 1 (inter-node group: this local rank on every node): a token goes once to each node holding any
of its experts, with a slot table of (expert within that node, router weight). The peer that receives
it (same local rank, destination node) relays it: hop 2 (intra-node group) sends it once to each rank
of that node holding one of its experts, with that rank's slots; there the rank-level fan-out runs.
On the way back the relay sums a row's per-rank outputs before the return trip across nodes, and the
sender sums over nodes, in node order.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardyard.comm.alltoall import Route, exchange_route
from shardyard.comm.dedup import dedup_rows, fan_out_and_sum, scatter_to_tokens
from shardyard.comm.wire import send, send_with_meta
from shardyard.models.moe.permute import gather_rows


def _exchange_route(d: Any, group: dist.ProcessGroup, send_counts: torch.Tensor) -> Route:
    """A one-exchange route over `group` for rows grouped by member (send_counts [members]), timed."""
    start = time.perf_counter()
    route = exchange_route(send_counts.view(-1, 1), group)
    d.ledger.add("a2a_ms", (time.perf_counter() - start) * 1e3)
    return route


def node_deduplicated(
    d: Any,
    tokens: torch.Tensor,
    token_of: torch.Tensor,
    weight_of: torch.Tensor,
    counts: torch.Tensor,
    num_tokens: int,
    experts: nn.Module,
) -> torch.Tensor:
    """The two hops (see the module docstring) for `d`, a comm.token_dispatch.TransportDispatcher (its
    groups, codec, slots and ledger): [T, width] out."""
    groups, ledger = d.a2a.groups, d.ledger
    nodes, per_node = groups.nodes_per_ep, d.ranks_per_node
    backward = tokens.requires_grad and torch.is_grad_enabled()
    per_rank = counts.view(d.ep_size, d.experts_per_rank).sum(1).cpu()
    ledger.add("microbatches", 1.0)
    ledger.add("tokens_in", float(token_of.numel()))
    timer = ledger.timer()

    # hop 1: node-level rows, expert ids within the destination node (local rank * E/ep + expert)
    outer = dedup_rows(token_of, weight_of, counts, num_tokens, nodes, d.node_slots)
    across = _exchange_route(d, groups.inter, outer.send_counts)
    relayed, relayed_meta = send_with_meta(gather_rows(tokens, outer.token), outer.meta, across, d.codec, timer)
    # hop 2, on the relay: every (row, slot) is an assignment to an expert of this node
    slots = relayed_meta.shape[1] // 2
    ids = relayed_meta[:, slots:].detach().to(torch.int64)
    row_idx, slot_idx = torch.nonzero(ids >= 0, as_tuple=True)
    node_expert = ids[row_idx, slot_idx]
    order = torch.argsort(node_expert * max(relayed.shape[0], 1) + row_idx)
    row_idx, slot_idx, node_expert = row_idx[order], slot_idx[order], node_expert[order]
    inner = dedup_rows(
        row_idx,
        relayed_meta[row_idx, slot_idx],
        torch.bincount(node_expert, minlength=per_node * d.experts_per_rank),
        relayed.shape[0],
        per_node,
        d.slots,
    )
    within = _exchange_route(d, groups.intra, inner.send_counts)
    rows, meta = send_with_meta(gather_rows(relayed, inner.token), inner.meta, within, d.codec, timer)
    summed, computed = fan_out_and_sum(rows, meta, experts, d.experts_per_rank)
    ledger.add("expert_rows", float(computed))
    node_sums = scatter_to_tokens(send(summed, within.reverse(), d.codec, timer), inner, relayed.shape[0])
    out = scatter_to_tokens(send(node_sums, across.reverse(), d.codec, timer), outer, num_tokens)

    width, size = tokens.shape[1], tokens.element_size()
    hop1, hop2 = outer.send_counts.cpu().double(), inner.send_counts.cpu().double()
    my_node, my_local = d.ep_rank // per_node, d.ep_rank % per_node
    row1 = ledger.row_bytes(width, size, backward, outer.meta.shape[1] * 4 // 2)
    row2 = ledger.row_bytes(width, size, backward, inner.meta.shape[1] * 4 // 2)
    ledger.add("rows_sent", float(hop1.sum()))
    ledger.add("bytes_sent", float(hop1.sum()) * row1 + float(hop2.sum()) * row2)
    ledger.add("bytes_internode", float(hop1.sum() - hop1[my_node]) * row1)
    ledger.add("bytes_remote", float(hop1.sum() - hop1[my_node]) * row1 + float(hop2.sum() - hop2[my_local]) * row2)
    ledger.account_baseline(per_rank, width, size, backward)
    return out
