"""Expert parallelism: each rank of an EP group keeps E/ep experts; tokens travel to them and back.

`ExpertParallelExperts` is a drop-in for `GroupedExperts` (same forward signature and result): rows
grouped by GLOBAL expert with offsets over all E experts in, expert outputs in the same order out.
Inside: per-expert counts are exchanged, rows are dispatched to the rank owning their expert, the
rank runs one grouped GEMM over its experts, and the outputs are combined back.

Between the rows and the transport sits the dispatch stack (DESIGN.md; parallel.dispatch in the
spec): deduplicate per destination rank (comm/dedup.py) -> optional LSH centroids (comm/lsh.py) ->
payload dtype (comm/wire.py) -> flat | hierarchical | leader transport (comm/alltoall.py), or the
local transport of a one-worker EP group. Counters for `comm.dispatch.dispatch_metrics` are kept
per layer in buffers.

EP rank r of an EP group owns global experts [r*E/ep, (r+1)*E/ep). Its `local` module is a
`GroupedExperts` holding exactly that slice of the full weights (parameters `local.w_up`, ...).

Gradients (`sync_gradients`): we reduce explicitly rather than through DDP, so that one function
handles both kinds of parameters with gloo and NCCL alike:
- dense parameters (replicated everywhere): all-reduce over the data-parallel world, divided by W;
- expert parameters: an expert's local gradient already sums the contributions of every token of
  its EP group (the all-to-all backward brings them home), so it is summed over the EDP group (the
  ranks holding the same shard) and divided by W as well. That is the gradient of the world-mean
  loss, identical to a single worker holding all experts and averaging over all W batches.
  (Dividing by the EDP size instead, a common slip, gives ep times too large expert gradients.)
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn

from shardyard.comm.alltoall import AllToAll, Route, build_all_to_all, exchange_route, transpose_index
from shardyard.comm.dedup import fan_out_and_sum, plan_dedup, scatter_to_tokens
from shardyard.comm.dispatch import COUNTERS, spread_error
from shardyard.comm.groups import ProcessGroups
from shardyard.comm.lsh import CentroidHasher, compress, expand, group_centered
from shardyard.comm.wire import Codec, LocalAllToAll, Timer, build_codec, send, send_with_meta
from shardyard.models.moe.accounting import recomputing
from shardyard.models.moe.experts import EXPERT_SHARD_ATTR, GroupedExperts, is_expert_shard
from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.permute import combine as weighted_sum
from shardyard.models.moe.permute import dispatch as gather_rows
from shardyard.models.moe.router import ExpertChoiceRouter
from shardyard.platform.schema import DispatchSpec, ParallelSpec


class ExpertParallelExperts(nn.Module):
    """This rank's experts behind the dispatch stack: [dedup ->] [LSH centroids ->] payload -> transport.

    `forward(x_sorted, offsets)` is the drop-in for `GroupedExperts` (LSH and the payload dtype apply);
    `forward_tokens(tokens, token_of, weight_of, offsets, num_tokens)` also takes over the weighted
    un-permute, which deduplication needs (it sums a token's expert outputs on the receiving rank).
    With `groups` None the EP group is this one worker (LocalAllToAll): nothing moves, but every stage
    runs, so its effect on quality shows on one worker. Counters for `dispatch_metrics` live in the
    non-persistent buffer `comm_counters`; LSH state in the persistent buffers of `.lsh`.
    """

    def __init__(
        self,
        experts: GroupedExperts,
        groups: ProcessGroups | None,
        a2a: str | AllToAll = "flat",
        dispatch: DispatchSpec | None = None,
        layer: int = 0,
        slots: int | None = None,
    ) -> None:
        super().__init__()
        num_experts, ep = experts.num_experts, (groups.ep_size if groups is not None else 1)
        if num_experts % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide num_experts ({num_experts})")
        self.num_experts = num_experts
        self.ep_size = ep
        self.experts_per_rank = num_experts // ep
        self.ep_rank = groups.ep_rank if groups is not None else 0
        self.first_expert = self.ep_rank * self.experts_per_rank
        if isinstance(a2a, AllToAll):
            self.a2a = a2a
        else:
            self.a2a = LocalAllToAll() if groups is None or ep == 1 else build_all_to_all(a2a, groups)
        self.layer = layer
        dispatch = dispatch or DispatchSpec()
        # node-level dedup needs >= 2 nodes of >= 2 ranks; otherwise it is exactly rank-level dedup
        self.ranks_per_node = groups.ranks_per_node_in_ep if groups is not None and groups.hierarchical_ok else ep
        node_dedup = dispatch.dedup == "node" and 1 < self.ranks_per_node < ep
        self.dedup: bool | str = "node" if node_dedup else bool(dispatch.dedup)
        self.codec = build_codec(dispatch.payload, dispatch.grad_payload)
        self.slots = min(slots or self.experts_per_rank, self.experts_per_rank)
        self.node_slots = min(slots or num_experts, self.experts_per_rank * self.ranks_per_node)
        width = experts.w_up.shape[1]
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
        lo, hi = self.first_expert, self.first_expert + self.experts_per_rank
        # Copy the module (config, hooks, buffers) without copying its full weights, then give it
        # this rank's slice of every parameter (all are stacked [E, ...] by expert).
        full = dict(experts.named_parameters(recurse=False))
        local = copy.deepcopy(experts, memo={id(p): None for p in full.values()})
        for name, p in full.items():
            shard = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
            setattr(shard, EXPERT_SHARD_ATTR, True)
            local._parameters[name] = shard
        local.num_experts = self.experts_per_rank
        self.local = local

    @property
    def backend(self) -> str:  # MoELayer.backend reads / sets its experts' backend
        return self.local.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.local.backend = name

    # ------------------------------------------------------------------ accounting
    def _add(self, slot: str, value: float) -> None:
        self.comm_counters[COUNTERS[slot]] += value

    def _row_bytes(self, width: int, element_size: int, backward: bool, extra_row_bytes: int = 0) -> int:
        """Bytes one row costs over the dispatch and return trips (and their gradients with a backward)."""
        per_row = 2 * (self.codec.row_bytes(width, element_size) + extra_row_bytes)
        if backward:
            per_row += 2 * (self.codec.grad_codec.row_bytes(width, element_size) + extra_row_bytes)
        return per_row

    def _other_node(self) -> torch.Tensor:
        """[P] bool: EP ranks on another node than this one."""
        node = torch.arange(self.ep_size) // self.ranks_per_node
        return node != self.ep_rank // self.ranks_per_node

    def _account(
        self,
        rows_by_rank: torch.Tensor,
        base_by_rank: torch.Tensor,
        width: int,
        element_size: int,
        backward: bool,
        extra_row_bytes: int = 0,
    ) -> None:
        """Bytes of the dispatch and return trips (and their gradients when a backward will run)."""
        rows, own = float(rows_by_rank.sum()), float(rows_by_rank[self.ep_rank])
        per_row = self._row_bytes(width, element_size, backward, extra_row_bytes)
        self._add("rows_sent", rows)
        self._add("bytes_sent", rows * per_row)
        self._add("bytes_remote", (rows - own) * per_row)
        self._add("bytes_internode", float(rows_by_rank[self._other_node()].sum()) * per_row)
        self._account_baseline(base_by_rank, width, element_size, backward)

    def _account_baseline(self, base_by_rank: torch.Tensor, width: int, element_size: int, backward: bool) -> None:
        """What today's dispatch moves: every (token, expert) copy in the input dtype, both ways."""
        base_row = 2 * width * element_size * (2 if backward else 1)
        base, base_own = float(base_by_rank.sum()), float(base_by_rank[self.ep_rank])
        self._add("baseline_bytes", base * base_row)
        self._add("baseline_remote", (base - base_own) * base_row)
        self._add("baseline_internode", float(base_by_rank[self._other_node()].sum()) * base_row)

    def _plan(self, counts: torch.Tensor) -> Route:
        start = time.perf_counter()
        route = self.a2a.plan(counts)
        self._add("a2a_ms", (time.perf_counter() - start) * 1e3)
        return route

    # ------------------------------------------------------------------ paths
    def _through_experts(self, rows: torch.Tensor, counts: torch.Tensor, codec: Codec) -> torch.Tensor:
        """rows grouped by global expert (counts [E]) -> their expert outputs, via the transport."""
        timer = Timer(self.comm_counters, COUNTERS["a2a_ms"])
        route = self._plan(counts.view(self.ep_size, self.experts_per_rank))
        recv = route.recv_counts  # [source EP rank, local expert]
        y = send(rows, route, codec, timer)  # rows (source, local expert)
        # group by local expert for one grouped GEMM: (source, expert) -> (expert, source)
        sizes = recv.cpu().numpy()
        y = y.index_select(0, transpose_index(sizes).to(y.device))
        local_offsets = torch.cumsum(recv.sum(0), 0).to(device=rows.device, dtype=torch.int32)
        out = self.local(y, local_offsets)
        self._add("expert_rows", float(out.shape[0]))
        out = out.index_select(0, transpose_index(sizes.T.copy()).to(out.device))
        return send(out, route.reverse(), codec, timer)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [M, width] grouped by global expert; offsets: [E] int32 cumulative row ends."""
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # on x's device (NCCL needs that)
        backward = x_sorted.requires_grad and torch.is_grad_enabled()
        per_rank = counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self._add("microbatches", 1.0)
        self._add("tokens_in", float(x_sorted.shape[0]))
        if self.lsh is None:
            self._account(per_rank, per_rank, x_sorted.shape[1], x_sorted.element_size(), backward)
            return self._through_experts(x_sorted, counts, self.codec)

        training = self.training and torch.is_grad_enabled() and not recomputing()
        if training:  # advance before hashing: an activation-checkpoint recompute then hashes alike
            self.lsh.advance(self._pending_ratio)
            self._pending_ratio = None
        cents = compress(x_sorted, counts, self.lsh.codes(x_sorted, counts), self.lsh.buckets_per_hash)
        sent = cents.counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self._account(sent, per_rank, x_sorted.shape[1], x_sorted.element_size(), backward)
        self._add("centroids_sent", float(cents.rows.shape[0]))
        out = expand(self._through_experts(cents.rows, cents.counts, self.codec), x_sorted, cents, self.lsh.residual)
        if training and self.lsh.measure_now():
            with torch.no_grad():
                exact = self._through_experts(x_sorted.detach(), counts, Codec())
                err_sq = (out.detach() - exact).double().square().sum()
                ref_sq = exact.double().square().sum()
                spread_sq = group_centered(exact, counts).double().square().sum()
                self._add("err_sq", float(err_sq))
                self._add("ref_sq", float(ref_sq))
                self._add("spread_sq", float(spread_sq))
                self._add("err_samples", 1.0)
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

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        num_tokens: int,
    ) -> torch.Tensor:
        """The MoE layer's dispatch -> experts -> weighted combine in one call: [T, width] out.

        Equals `permute.combine(self(permute.dispatch(tokens, token_of), offsets), weight_of, token_of,
        num_tokens)` up to the association of each token's k-term sums: a token's terms are summed per
        destination rank first (experts in order), then over ranks in rank order, and the same holds
        for its input gradient. That is the association deduplication needs (the receiving rank sums
        before the return trip), so dedup on and off are bit-identical, outputs and gradients.
        """
        ends = offsets.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        if not self.dedup:
            return self._rank_associated(tokens, token_of, weight_of, offsets, counts, num_tokens)
        if self.dedup == "node":
            return self._node_deduplicated(tokens, token_of, weight_of, counts, num_tokens)
        backward = tokens.requires_grad and torch.is_grad_enabled()
        plan = plan_dedup(token_of, weight_of, counts, num_tokens, self.ep_size, self.slots)
        per_rank = counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self._add("microbatches", 1.0)
        self._add("tokens_in", float(token_of.numel()))
        self._account(
            plan.send_counts.cpu(),
            per_rank,
            tokens.shape[1],
            tokens.element_size(),
            backward,
            extra_row_bytes=plan.meta.shape[1] * 4 // 2,
        )  # meta out and its weight grads back
        timer = Timer(self.comm_counters, COUNTERS["a2a_ms"])
        route = self._plan(plan.send_counts.view(self.ep_size, 1))
        rows, meta = send_with_meta(gather_rows(tokens, plan.token), plan.meta, route, self.codec, timer)
        summed, computed = fan_out_and_sum(rows, meta, self.local, self.experts_per_rank)
        self._add("expert_rows", float(computed))
        back = send(summed, route.reverse(), self.codec, timer)
        return scatter_to_tokens(back, plan, num_tokens)

    def _node_deduplicated(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        counts: torch.Tensor,
        num_tokens: int,
    ) -> torch.Tensor:
        """One copy per destination node across the inter-node link, then one per rank inside the node.

        Hop 1 (inter-node group: this local rank on every node): a token goes once to each node holding
        any of its experts, with a slot table of (expert within that node, router weight). The peer
        that receives it (same local rank, destination node) relays it: hop 2 (intra-node group) sends
        it once to each rank of that node holding one of its experts, with that rank's slots; there
        the rank-level fan-out runs. On the way back the relay sums a row's per-rank outputs before
        the return trip across nodes, and the sender sums over nodes, in node order.
        """
        groups = self.a2a.groups
        nodes, per_node = groups.nodes_per_ep, self.ranks_per_node
        backward = tokens.requires_grad and torch.is_grad_enabled()
        per_rank = counts.view(self.ep_size, self.experts_per_rank).sum(1).cpu()
        self._add("microbatches", 1.0)
        self._add("tokens_in", float(token_of.numel()))
        timer = Timer(self.comm_counters, COUNTERS["a2a_ms"])

        # hop 1: node-level rows, expert ids within the destination node (local rank * E/ep + expert)
        outer = plan_dedup(token_of, weight_of, counts, num_tokens, nodes, self.node_slots)
        across = self._exchange_route(groups.inter, outer.send_counts)
        relayed, relayed_meta = send_with_meta(gather_rows(tokens, outer.token), outer.meta, across, self.codec, timer)
        # hop 2, on the relay: every (row, slot) is an assignment to an expert of this node
        slots = relayed_meta.shape[1] // 2
        ids = relayed_meta[:, slots:].detach().to(torch.int64)
        row_idx, slot_idx = torch.nonzero(ids >= 0, as_tuple=True)
        node_expert = ids[row_idx, slot_idx]
        order = torch.argsort(node_expert * max(relayed.shape[0], 1) + row_idx)
        row_idx, slot_idx, node_expert = row_idx[order], slot_idx[order], node_expert[order]
        inner = plan_dedup(
            row_idx,
            relayed_meta[row_idx, slot_idx],
            torch.bincount(node_expert, minlength=per_node * self.experts_per_rank),
            relayed.shape[0],
            per_node,
            self.slots,
        )
        within = self._exchange_route(groups.intra, inner.send_counts)
        rows, meta = send_with_meta(gather_rows(relayed, inner.token), inner.meta, within, self.codec, timer)
        summed, computed = fan_out_and_sum(rows, meta, self.local, self.experts_per_rank)
        self._add("expert_rows", float(computed))
        node_sums = scatter_to_tokens(send(summed, within.reverse(), self.codec, timer), inner, relayed.shape[0])
        out = scatter_to_tokens(send(node_sums, across.reverse(), self.codec, timer), outer, num_tokens)

        width, size = tokens.shape[1], tokens.element_size()
        hop1, hop2 = outer.send_counts.cpu().double(), inner.send_counts.cpu().double()
        my_node, my_local = self.ep_rank // per_node, self.ep_rank % per_node
        row1 = self._row_bytes(width, size, backward, outer.meta.shape[1] * 4 // 2)
        row2 = self._row_bytes(width, size, backward, inner.meta.shape[1] * 4 // 2)
        self._add("rows_sent", float(hop1.sum()))
        self._add("bytes_sent", float(hop1.sum()) * row1 + float(hop2.sum()) * row2)
        self._add("bytes_internode", float(hop1.sum() - hop1[my_node]) * row1)
        self._add("bytes_remote", float(hop1.sum() - hop1[my_node]) * row1 + float(hop2.sum() - hop2[my_local]) * row2)
        self._account_baseline(per_rank, width, size, backward)
        return out

    def _exchange_route(self, group: dist.ProcessGroup, send_counts: torch.Tensor) -> Route:
        """A one-exchange route over `group` for rows grouped by member (send_counts [members]), timed."""
        start = time.perf_counter()
        route = exchange_route(send_counts.view(-1, 1), group)
        self._add("a2a_ms", (time.perf_counter() - start) * 1e3)
        return route

    def _rank_associated(
        self,
        tokens: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        offsets: torch.Tensor,
        counts: torch.Tensor,
        num_tokens: int,
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
        partial = weighted_sum(self(rows, offsets), weight_of, inverse, unique_pair.numel())
        return partial.new_zeros(num_tokens, partial.shape[1]).index_add(0, per_rank_token, partial)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.experts_per_rank - 1} of "
            f"{self.num_experts}, ep={self.ep_size}, a2a={self.a2a.name}, dedup={self.dedup}, "
            f"payload={self.codec.name}"
        )


def apply_expert_parallel(
    model: nn.Module, groups: ProcessGroups | None, parallel: ParallelSpec | str = "flat"
) -> nn.Module:
    """Swap every MoELayer's `.experts` for an ExpertParallelExperts keeping this rank's slice.

    `parallel` is the job's `spec.parallel` (a2a algorithm and dispatch stages) or just an a2a name.
    The layers are wrapped when the EP group has more than one rank or any dispatch stage changes what
    travels (`parallel.dispatch.compressed`); `groups` None means one worker (EP 1, nothing moves).
    All ranks must hold the same full weights beforehand (same seed, or a broadcast). In place;
    returns the model.
    """
    spec = parallel if isinstance(parallel, ParallelSpec) else ParallelSpec(a2a=parallel)
    ep = groups.ep_size if groups is not None else 1
    if ep == 1 and not spec.dispatch.compressed:
        return model
    algo: AllToAll = LocalAllToAll() if ep == 1 else build_all_to_all(spec.a2a, groups)
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and isinstance(m.experts, GroupedExperts)]
    for index, module in enumerate(layers):
        slots = module.num_experts if isinstance(module.router, ExpertChoiceRouter) else module.top_k
        module.experts = ExpertParallelExperts(
            module.experts, groups if ep > 1 else None, algo, spec.dispatch, layer=index, slots=slots
        )
    return model


def all_reduce_mean_(params: list[nn.Parameter], group: dist.ProcessGroup | None, world: int) -> None:
    """Sum the gradients of `params` over `group` and divide by `world`: one all-reduce per dtype
    over the concatenated gradients. A parameter without a gradient gets a zero one, so every rank
    reduces the same buffers."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ProcessGroups) -> None:
    """Average gradients to those of the world-mean loss: dense over the world, experts over EDP.

    Call after backward, before clipping and the optimizer step; collective over the world. The
    parallelism plan (runtime.parallel.mesh) does the same with the same helper; tests use this.
    """
    world = groups.topology.world_size
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    all_reduce_mean_([p for p in params if not is_expert_shard(p)], None, world)  # the whole world
    all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.edp, world)
