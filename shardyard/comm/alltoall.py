"""All-to-all for expert parallelism: `route(counts) -> Route`; `run_route(x, route)` dispatches and
`run_route(y, route.reverse())` combines.

Every rank of the expert-parallel (EP) group holds rows `x` grouped by destination EP rank
(`counts[j].sum()` rows for rank j). The dispatch returns the rows every rank sent to this one,
grouped by source EP rank (`route.recv_counts`); the reverse route sends them back, so
combine(dispatch(x)) == x. Counts may be uneven and zero. Both are differentiable: the backward of
one is the other. The token dispatcher (dedup, LSH, payload dtype; comm/token_dispatch.py) sits on top.

Three algorithms; they only move rows, never add them, so all three are bit-identical to `flat`:

- `flat`: one all_to_all_single over the EP group (after one exchange of the counts).
  A rank sends P-1 messages, (N-1)*L of them across nodes.
- `hierarchical` (2-D, as in Tutel / DeepSpeed-MoE): (1) intra-node all-to-all so local rank j holds
  everything its node sends to local rank j of every node; (2) one all-to-all among the ranks with
  the same local rank across nodes. Rows arrive already in source-rank order. L-1 intra messages and
  N-1 inter-node messages per rank, carrying L times more bytes each.
- `local`: an EP group of one rank; nothing moves.
- `leader`: local rank 0 gathers its node's rows, the leaders do an all-to-all across nodes, and each
  leader scatters to its node's ranks. N-1 inter-node messages per node, all through one process.

Routing (`AllToAll.route`) exchanges per-destination counts along the same path the rows will take
and returns a `Route`: a list of invertible stages (local block transposes, collective exchanges,
gathers/scatters). Running the stages in reverse with inverted stages is the combine / backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shardyard.comm.groups import ProcessGroups

ALGORITHMS = ("flat", "hierarchical", "leader")


# ------------------------------------------------------------------------------------------- stages
def transpose_index(sizes: np.ndarray) -> torch.Tensor:
    """Row index that reorders blocks laid out (a, b) with row counts sizes[a, b] into order (b, a)."""
    flat = sizes.reshape(-1)
    starts = (np.cumsum(flat) - flat).reshape(sizes.shape)
    new_starts, new_len = starts.T.reshape(-1), sizes.T.reshape(-1)
    shift = np.repeat(new_starts - (np.cumsum(new_len) - new_len), new_len)
    return torch.from_numpy(shift + np.arange(int(new_len.sum()), dtype=np.int64))


class Stage(ABC):
    @abstractmethod
    def run(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self) -> Stage: ...


@dataclass
class Transpose(Stage):
    """Local reorder of row blocks from (a, b) to (b, a)."""

    sizes: np.ndarray  # [A, B] rows per block

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if 1 in self.sizes.shape:
            return x
        return x.index_select(0, transpose_index(self.sizes))

    def inverse(self) -> Transpose:
        return Transpose(np.ascontiguousarray(self.sizes.T))


@dataclass
class Exchange(Stage):
    """all_to_all_single over `group`: send[i] rows to member i, recv[i] rows from member i."""

    group: dist.ProcessGroup
    send: list[int]
    recv: list[int]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.send) == 1:
            return x
        out = x.new_empty((sum(self.recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), self.recv, self.send, group=self.group)
        return out

    def inverse(self) -> Exchange:
        return Exchange(self.group, self.recv, self.send)


@dataclass
class Funnel(Stage):
    """Gather rows of every member on `leader` (to_leader) or scatter them back, point to point.

    On the leader `sizes[i]` is member i's row count; on a member `sizes == [own rows]`.
    """

    ranks: list[int]  # global ranks of the group, leader first
    me: int
    sizes: list[int]
    to_leader: bool

    def run(self, x: torch.Tensor) -> torch.Tensor:
        leader = self.ranks[0]
        if len(self.ranks) == 1:
            return x
        if self.me != leader:
            if self.to_leader:
                if self.sizes[0]:
                    dist.send(x.contiguous(), dst=leader)
                return x.new_empty((0, *x.shape[1:]))
            out = x.new_empty((self.sizes[0], *x.shape[1:]))
            if self.sizes[0]:
                dist.recv(out, src=leader)
            return out
        bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        if self.to_leader:
            out = x.new_empty((int(bounds[-1]), *x.shape[1:]))
            out[: self.sizes[0]] = x
            work = [
                dist.irecv(out[bounds[i] : bounds[i + 1]], src=r)
                for i, r in enumerate(self.ranks)
                if i and self.sizes[i]
            ]
        else:
            out = x[: self.sizes[0]]
            work = [
                dist.isend(x[bounds[i] : bounds[i + 1]].contiguous(), dst=r)
                for i, r in enumerate(self.ranks)
                if i and self.sizes[i]
            ]
        for w in work:
            w.wait()
        return out

    def inverse(self) -> Funnel:
        return Funnel(self.ranks, self.me, self.sizes, not self.to_leader)


@dataclass
class Route:
    """How rows travel for one dispatch; `reverse()` is the way back (combine / backward)."""

    stages: list[Stage]
    send_counts: torch.Tensor  # [P, k] rows this rank sends to each EP rank, per sub-group (expert)
    recv_counts: torch.Tensor  # [P, k] rows this rank receives from each EP rank, per sub-group

    @property
    def send_splits(self) -> list[int]:
        return self.send_counts.sum(1).tolist()

    @property
    def recv_splits(self) -> list[int]:
        return self.recv_counts.sum(1).tolist()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.run(x)
        return x

    def reverse(self) -> Route:
        return Route([s.inverse() for s in reversed(self.stages)], self.recv_counts, self.send_counts)


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, route: Route) -> torch.Tensor:  # type: ignore[override]
        ctx.route = route
        y = route.run(x)
        return y.clone() if y is x else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.route.reverse().run(grad.contiguous()), None


def run_route(x: torch.Tensor, route: Route) -> torch.Tensor:
    """Differentiable: move rows along `route`; the backward moves gradients along `route.reverse()`."""
    return _RouteFn.apply(x, route)


# ------------------------------------------------------------------------------------- algorithms
class AllToAll(ABC):
    name: str

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self.size = groups.ep_size

    @abstractmethod
    def route(self, counts: torch.Tensor) -> Route:
        """counts [P, k] int64: rows for EP rank j, sub-grouped k ways (e.g. by that rank's experts).

        Collective over the EP group. The Route's recv_counts [P, k] are the counts every rank sent here.
        """


def _exchange_equal(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single with equal splits along dim 0 (t's first dim = group size)."""
    t = t.contiguous()  # (empty_like of a permuted view would keep its strides)
    if t.shape[0] == 1:
        return t.clone()
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


def exchange_route(counts: torch.Tensor, group: dist.ProcessGroup) -> Route:
    """One all_to_all_single over `group` for rows grouped by member (counts [members, k]); collective."""
    recv = _exchange_equal(counts, group)
    return Route([Exchange(group, counts.sum(1).tolist(), recv.sum(1).tolist())], counts, recv)


class FlatAllToAll(AllToAll):
    name = "flat"

    def route(self, counts: torch.Tensor) -> Route:
        return exchange_route(counts, self.groups.ep)


class _NodeAwareAllToAll(AllToAll):
    """Base of the two-level algorithms: they need the EP group to be whole nodes of equal size."""

    def __init__(self, groups: ProcessGroups) -> None:
        super().__init__(groups)
        if not groups.hierarchical_ok:
            raise ValueError(f"{self.name} all-to-all needs the EP group to be whole nodes of equal size")


class HierarchicalAllToAll(_NodeAwareAllToAll):
    name = "hierarchical"

    def route(self, counts: torch.Tensor) -> Route:
        g = self.groups
        n_nodes, per_node, k = g.nodes_per_ep, g.ranks_per_node_in_ep, counts.shape[1]
        c = counts.view(n_nodes, per_node, k)  # [dest node m, dest local j, k]
        d = _exchange_equal(c.permute(1, 0, 2), g.intra)  # [src local l, dest node m, k]
        r = _exchange_equal(d.permute(1, 0, 2), g.inter)  # [src node n, src local l, k]
        cs, ds, rs = (t.sum(-1).cpu().numpy() for t in (c, d, r))
        stages: list[Stage] = [
            Transpose(cs),  # (m, j) -> (j, m)
            Exchange(g.intra, cs.sum(0).tolist(), ds.sum(1).tolist()),  # to local j; from local l
            Transpose(ds),  # (l, m) -> (m, l)
            Exchange(g.inter, ds.sum(0).tolist(), rs.sum(1).tolist()),  # to node m; from node n
        ]
        return Route(stages, counts, r.reshape(n_nodes * per_node, k))


class LeaderAllToAll(_NodeAwareAllToAll):
    name = "leader"

    def route(self, counts: torch.Tensor) -> Route:
        g, me = self.groups, self.groups.topology.rank
        n_nodes, per_node, k = g.nodes_per_ep, g.ranks_per_node_in_ep, counts.shape[1]
        leader = g.intra_ranks[0]
        own_rows = int(counts.sum().item())
        if me != leader:
            if per_node > 1:
                dist.gather(counts.contiguous(), None, dst=leader, group=g.intra)
            r = torch.empty(n_nodes, per_node, k, dtype=torch.int64, device=counts.device)
            if per_node > 1:
                dist.scatter(r, None, src=leader, group=g.intra)
            recv = r.reshape(-1, k)
            stages: list[Stage] = [
                Funnel(g.intra_ranks, me, [own_rows], True),
                Funnel(g.intra_ranks, me, [int(recv.sum())], False),
            ]
            return Route(stages, counts, recv)
        if per_node > 1:
            gathered = [torch.empty_like(counts) for _ in range(per_node)]
            dist.gather(counts.contiguous(), gathered, dst=leader, group=g.intra)
        else:
            gathered = [counts]
        gc = torch.stack(gathered).view(per_node, n_nodes, per_node, k)  # [src l, dest m, dest j, k]
        h = _exchange_equal(gc.permute(1, 0, 2, 3), g.inter)  # [src node n, src l, dest j, k]
        scat = list(h.permute(2, 0, 1, 3).contiguous().unbind(0))  # per dest local j: [n, l, k]
        r = torch.empty(n_nodes, per_node, k, dtype=torch.int64, device=counts.device)
        if per_node > 1:
            dist.scatter(r, scat, src=leader, group=g.intra)
        else:
            r = scat[0]
        gs, hs = gc.sum(-1).cpu().numpy(), h.sum(-1).cpu().numpy()  # [l, m, j], [n, l, j]
        stages = [
            Funnel(g.intra_ranks, me, gs.sum((1, 2)).tolist(), True),  # rows (l, m, j)
            Transpose(gs.sum(2)),  # (l, m) -> (m, l)
            Exchange(g.inter, gs.sum((0, 2)).tolist(), hs.sum((1, 2)).tolist()),  # rows (n, l, j)
            Transpose(hs.reshape(n_nodes * per_node, per_node)),  # ((n, l), j) -> (j, (n, l))
            Funnel(g.intra_ranks, me, hs.sum((0, 1)).tolist(), False),
        ]
        return Route(stages, counts, r.reshape(-1, k))


class LocalAllToAll(AllToAll):
    """The transport of a one-rank EP group: nothing moves (every row is for this rank), so every
    dispatch stage above it runs unchanged and its effect on quality shows without a cluster."""

    name = "local"

    def __init__(self) -> None:  # no process groups
        self.groups = None  # type: ignore[assignment]
        self.size = 1

    def route(self, counts: torch.Tensor) -> Route:
        return Route([], counts, counts)


def build_all_to_all(name: str, groups: ProcessGroups | None) -> AllToAll:
    """`flat`, `hierarchical` or `leader`. With the EP group inside one node all three are flat; an EP
    group of one rank (or none) is the local transport."""
    if groups is None or groups.ep_size == 1:
        return LocalAllToAll()
    classes: dict[str, type[AllToAll]] = {
        "flat": FlatAllToAll,
        "hierarchical": HierarchicalAllToAll,
        "leader": LeaderAllToAll,
    }
    if name not in classes:
        raise ValueError(f"unknown all-to-all {name!r}; available: {', '.join(classes)}")
    if groups.nodes_per_ep == 1:
        name = "flat"
    return classes[name](groups)
