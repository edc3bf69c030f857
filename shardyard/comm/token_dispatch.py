"""The expert-parallel token dispatcher: each rank of an EP group keeps E/ep experts; tokens travel.

`TransportDispatcher` implements models.moe.dispatcher.TokenDispatcher over one transport
(comm/alltoall.py: flat | hierarchical | leader, or `local` for an EP group of one rank) with the
dispatch stages (DESIGN.md; parallel.dispatch in the spec) between the rows and the transport:

    [dedup (comm/dedup.py; node level: comm/node_dedup.py) | LSH centroids (comm/lsh.py)]
        -> payload codec (comm/wire.py) -> transport

and the accounting stage (comm/ledger.py) beside them. EP rank r owns global experts
[r*E/ep, (r+1)*E/ep); the MoE layer's `experts` module holds exactly that slice (runtime.parallel
places it). Per-expert counts are exchanged, rows go to the rank owning their expert, that rank runs
one grouped GEMM over its experts, and the outputs come back.

`forward` (what the MoE layer calls) also does the weighted un-permute: a token's terms are summed per
destination rank first (experts in order), then over ranks in rank order, and the same holds for its
input gradient. That is the association deduplication needs (the receiving rank sums before the
return trip), so dedup on and off are bit-identical, outputs and gradients. `run_experts` is the
plain stage below: rows grouped by global expert in, their expert outputs in the same order out.

With an EP group of one nothing moves, but every stage runs, so its effect on quality shows on one
worker. Counters for `comm.dispatch_metrics.dispatch_metrics` live in the non-persistent buffer
`comm_counters`; LSH state in the persistent buffers of `.lsh`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardyard.comm.alltoall import AllToAll, build_all_to_all, transpose_index
from shardyard.comm.dedup import dedup_rows, fan_out_and_sum, scatter_to_tokens
from shardyard.comm.dispatch_metrics import COUNTERS, spread_error
from shardyard.comm.groups import ProcessGroups
from shardyard.comm.ledger import Ledger
from shardyard.comm.lsh import CentroidHasher, compress, expand, group_centered
from shardyard.comm.node_dedup import node_deduplicated
from shardyard.comm.wire import Codec, build_codec, send, send_with_meta
from shardyard.models.moe.accounting import recomputing
from shardyard.models.moe.dispatcher import LocalDispatcher, TokenDispatcher
from shardyard.models.moe.permute import gather_rows, weighted_sum
from shardyard.platform.schema import DispatchSpec


class TransportDispatcher(TokenDispatcher):
    """Dispatch over a transport with the dedup / LSH / codec stages (see the module docstring)."""

    # forward runs eagerly under training.compile (data-dependent splits, collectives, a host-side
    # ledger): parallelize.apply_compile disables it there, so no process imports dynamo (~0.9 s) for it
    eager_under_compile = True

    def __init__(
        self,
        num_experts: int,
        width: int,
        groups: ProcessGroups | None,
        a2a: str | AllToAll = "flat",
        dispatch: DispatchSpec | None = None,
        layer: int = 0,
        slots: int | None = None,
    ) -> None:
        super().__init__()
        ep = groups.ep_size if groups is not None else 1
        if num_experts % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide num_experts ({num_experts})")
        self.num_experts = num_experts
        self.ep_size = ep
        self.experts_per_rank = num_experts // ep
        self.ep_rank = groups.ep_rank if groups is not None else 0
        self.first_expert = self.ep_rank * self.experts_per_rank
        self.a2a = a2a if isinstance(a2a, AllToAll) else build_all_to_all(a2a, groups)
        self.layer = layer
        dispatch = dispatch or DispatchSpec()
        # node-level dedup needs >= 2 nodes of >= 2 ranks; otherwise it is exactly rank-level dedup
        self.ranks_per_node = groups.ranks_per_node_in_ep if groups is not None and groups.hierarchical_ok else ep
        node_dedup = dispatch.dedup == "node" and 1 < self.ranks_per_node < ep
        self.dedup: bool | str = "node" if node_dedup else bool(dispatch.dedup)
        self.codec = build_codec(dispatch.payload, dispatch.grad_payload)
        self.slots = min(slots or self.experts_per_rank, self.experts_per_rank)
        self.node_slots = min(slots or num_experts, self.experts_per_rank * self.ranks_per_node)
        lsh = dispatch.lsh
        self.lsh = (
            None
            if lsh is None
            else CentroidHasher(
                width,
                layer,
                lsh.hashes,
                lsh.buckets_per_hash,
                lsh.rotation_refresh,
                lsh.target_ratio,
                lsh.error_every,
                lsh.seed,
                lsh.residual,
                lsh.max_error,
                lsh.center,
            )
        )
        self._pending_ratio: float | None = None  # last micro-batch's centroids / rows, for target_ratio
        self.register_buffer("comm_counters", torch.zeros(len(COUNTERS), dtype=torch.float64), persistent=False)
        self.ledger = Ledger(self, self.codec, ep, self.ep_rank, self.ranks_per_node)

    # ------------------------------------------------------------------ the plain stage
    def _through_experts(
        self, rows: torch.Tensor, counts: torch.Tensor, codec: Codec, experts: nn.Module
    ) -> torch.Tensor:
        """rows grouped by global expert (counts [E]) -> their expert outputs, via the transport."""
        timer = self.ledger.timer()
        route = self.ledger.route(self.a2a, counts.view(self.ep_size, self.experts_per_rank))
        recv = route.recv_counts  # [source EP rank, local expert]
        y = send(rows, route, codec, timer)  # rows (source, local expert)
        # group by local expert for one grouped GEMM: (source, expert) -> (expert, source)
        sizes = recv.cpu().numpy()
        y = y.index_select(0, transpose_index(sizes).to(y.device))
        local_offsets = torch.cumsum(recv.sum(0), 0).to(device=rows.device, dtype=torch.int32)
        out = experts(y, local_offsets)
        self.ledger.add("expert_rows", float(out.shape[0]))
        out = out.index_select(0, transpose_index(sizes.T.copy()).to(out.device))
        return send(out, route.reverse(), codec, timer)

    def run_experts(self, x_sorted: torch.Tensor, offsets: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """x_sorted: [M, width] grouped by global expert; offsets: [E] int32 cumulative row ends.
        Their expert outputs in the same order (LSH and the payload codec apply)."""
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # on x's device (NCCL needs that)
        backward = x_sorted.requires_grad and torch.is_grad_enabled()
        per_rank = counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self.ledger.add("microbatches", 1.0)
        self.ledger.add("tokens_in", float(x_sorted.shape[0]))
        if self.lsh is None:
            self.ledger.account(per_rank, per_rank, x_sorted.shape[1], x_sorted.element_size(), backward)
            return self._through_experts(x_sorted, counts, self.codec, experts)
        return self._lsh(x_sorted, counts, per_rank, backward, experts)

    # ------------------------------------------------------------------ the LSH stage
    def _lsh(
        self,
        x_sorted: torch.Tensor,
        counts: torch.Tensor,
        per_rank: torch.Tensor,
        backward: bool,
        experts: nn.Module,
    ) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled() and not recomputing()
        if training:  # advance before hashing: an activation-checkpoint recompute then hashes alike
            self.lsh.advance(self._pending_ratio)
            self._pending_ratio = None
        cents = compress(x_sorted, counts, self.lsh.codes(x_sorted, counts), self.lsh.buckets_per_hash)
        sent = cents.counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self.ledger.account(sent, per_rank, x_sorted.shape[1], x_sorted.element_size(), backward)
        self.ledger.add("centroids_sent", float(cents.rows.shape[0]))
        out = expand(
            self._through_experts(cents.rows, cents.counts, self.codec, experts), x_sorted, cents, self.lsh.residual
        )
        if training and self.lsh.measure_now():
            with torch.no_grad():
                exact = self._through_experts(x_sorted.detach(), counts, Codec(), experts)
                err_sq = (out.detach() - exact).double().square().sum()
                ref_sq = exact.double().square().sum()
                spread_sq = group_centered(exact, counts).double().square().sum()
                self.ledger.add("err_sq", float(err_sq))
                self.ledger.add("ref_sq", float(ref_sq))
                self.ledger.add("spread_sq", float(spread_sq))
                self.ledger.add("err_samples", 1.0)
                if self.lsh.max_error is not None:
                    self.lsh.steer_by_error(self._group_error(err_sq, spread_sq, ref_sq))
        if training:  # applied at the next training micro-batch (see above)
            self._pending_ratio = self._global_ratio(cents.rows.shape[0], x_sorted.shape[0])
        return out

    def _group_error(self, err_sq: torch.Tensor, spread_sq: torch.Tensor, ref_sq: torch.Tensor) -> float:
        """`spread_error` over the EP group (one three-number all-reduce): the same on every rank."""
        t = torch.stack([err_sq, spread_sq, ref_sq]).double()
        if self.ep_size > 1:
            t = t.to(self.comm_counters.device)
            dist.all_reduce(t, group=self.a2a.groups.ep)
            t = t.cpu()
        return spread_error(*t.tolist())

    def _global_ratio(self, centroids: int, rows: int) -> float | None:
        """centroids / rows over the EP group (a tiny all-reduce), for target_ratio adaptation."""
        if self.lsh is None or self.lsh.target_ratio is None:
            return None
        t = torch.tensor([float(centroids), float(rows)], dtype=torch.float64)
        if self.ep_size > 1:
            t = t.to(self.comm_counters.device)
            dist.all_reduce(t, group=self.a2a.groups.ep)
            t = t.cpu()
        return float(t[0] / t[1].clamp(min=1))

    # ------------------------------------------------------------------ what the layer calls
    def forward(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        num_tokens: int,
        experts: nn.Module,
    ) -> torch.Tensor:
        """Dispatch -> experts -> weighted combine: [T, width] out.

        Equals `permute.weighted_sum(self.run_experts(permute.gather_rows(tokens, token_of), offsets, experts),
        weight_of, token_of, num_tokens)` up to the association of each token's k-term sums (see the
        module docstring)."""
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        if not self.dedup:
            return self._rank_associated(tokens, token_of, weight_of, offsets, counts, num_tokens, experts)
        if self.dedup == "node":
            return node_deduplicated(self, tokens, token_of, weight_of, counts, num_tokens, experts)
        return self._deduplicated(tokens, token_of, weight_of, counts, num_tokens, experts)

    def _deduplicated(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        counts: torch.Tensor,
        num_tokens: int,
        experts: nn.Module,
    ) -> torch.Tensor:
        """The dedup stage: one copy of a token per destination rank, with its (expert, weight) slots."""
        backward = tokens.requires_grad and torch.is_grad_enabled()
        unique = dedup_rows(token_of, weight_of, counts, num_tokens, self.ep_size, self.slots)
        per_rank = counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self.ledger.add("microbatches", 1.0)
        self.ledger.add("tokens_in", float(token_of.numel()))
        self.ledger.account(
            unique.send_counts.cpu(),
            per_rank,
            tokens.shape[1],
            tokens.element_size(),
            backward,
            extra_row_bytes=unique.meta.shape[1] * 4 // 2,
        )  # meta out and its weight grads back
        timer = self.ledger.timer()
        route = self.ledger.route(self.a2a, unique.send_counts.view(self.ep_size, 1))
        rows, meta = send_with_meta(gather_rows(tokens, unique.token), unique.meta, route, self.codec, timer)
        summed, computed = fan_out_and_sum(rows, meta, experts, self.experts_per_rank)
        self.ledger.add("expert_rows", float(computed))
        back = send(summed, route.reverse(), self.codec, timer)
        return scatter_to_tokens(back, unique, num_tokens)

    def _rank_associated(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        counts: torch.Tensor,
        num_tokens: int,
        experts: nn.Module,
    ) -> torch.Tensor:
        """k copies on the wire (no dedup), sums associated per (destination rank, token): tokens ->
        one row per (rank, token) -> its expert rows, and back: weighted sum into the (rank, token)
        rows, then into tokens in rank order. Costs two extra row gathers / index_adds on this rank."""
        expert_of = torch.repeat_interleave(
            torch.arange(self.num_experts, device=counts.device), counts, output_size=token_of.numel()
        )
        pair = (expert_of // self.experts_per_rank) * num_tokens + token_of
        unique_pair, inverse = torch.unique(pair, return_inverse=True)
        per_rank_token = unique_pair % num_tokens
        rows = gather_rows(gather_rows(tokens, per_rank_token), inverse)
        partial = weighted_sum(self.run_experts(rows, offsets, experts), weight_of, inverse, unique_pair.numel())
        return partial.new_zeros(num_tokens, partial.shape[1]).index_add(0, per_rank_token, partial)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.experts_per_rank - 1} of "
            f"{self.num_experts}, ep={self.ep_size}, a2a={self.a2a.name}, dedup={self.dedup}, "
            f"payload={self.codec.name}"
        )


def build_token_dispatcher(
    num_experts: int,
    width: int,
    groups: ProcessGroups | None,
    dispatch: DispatchSpec,
    a2a: str | AllToAll = "flat",
    layer: int = 0,
    slots: int | None = None,
) -> TokenDispatcher:
    """The dispatcher the spec asks for: the local one for an EP group of one rank with no stage that
    changes what travels, else a transport dispatcher."""
    ep = groups.ep_size if groups is not None else 1
    if ep == 1 and not dispatch.compressed:
        return LocalDispatcher()
    return TransportDispatcher(num_experts, width, groups, a2a, dispatch, layer=layer, slots=slots)
