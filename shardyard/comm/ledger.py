"""The accounting stage of expert dispatch: rows, bytes and time into a dispatcher's counters.

A `Ledger` writes into its owner's non-persistent float64 buffer `comm_counters` (slots named by
comm.dispatch_metrics.COUNTERS; read and reset by `dispatch_metrics`). It reads the buffer through the owner
at every call, so the owner may move devices. Byte counts are this rank's view (see comm/dispatch_metrics.py).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from shardyard.comm.alltoall import AllToAll, Route
from shardyard.comm.dispatch_metrics import COUNTERS
from shardyard.comm.wire import Codec, Timer


class Ledger:
    def __init__(self, owner: nn.Module, codec: Codec, ep_size: int, ep_rank: int, ranks_per_node: int) -> None:
        self.owner = owner  # holds the `comm_counters` buffer
        self.codec = codec
        self.ep_size, self.ep_rank, self.ranks_per_node = ep_size, ep_rank, ranks_per_node

    @property
    def counters(self) -> torch.Tensor:
        return self.owner.comm_counters

    def add(self, slot: str, value: float) -> None:
        self.counters[COUNTERS[slot]] += value

    def timer(self) -> Timer:
        """Transport wall time into a2a_ms."""
        return Timer(self.counters, COUNTERS["a2a_ms"])

    def route(self, a2a: AllToAll, counts: torch.Tensor) -> Route:
        """`a2a.route(counts)`, its wall time into a2a_ms."""
        start = time.perf_counter()
        route = a2a.route(counts)
        self.add("a2a_ms", (time.perf_counter() - start) * 1e3)
        return route

    def row_bytes(self, width: int, element_size: int, backward: bool, extra_row_bytes: int = 0) -> int:
        """Bytes one row costs over the dispatch and return trips (and their gradients with a backward)."""
        per_row = 2 * (self.codec.row_bytes(width, element_size) + extra_row_bytes)
        if backward:
            per_row += 2 * (self.codec.grad_codec.row_bytes(width, element_size) + extra_row_bytes)
        return per_row

    def other_node(self) -> torch.Tensor:
        """[P] bool: EP ranks on another node than this one."""
        node = torch.arange(self.ep_size) // self.ranks_per_node
        return node != self.ep_rank // self.ranks_per_node

    def account(
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
        per_row = self.row_bytes(width, element_size, backward, extra_row_bytes)
        self.add("rows_sent", rows)
        self.add("bytes_sent", rows * per_row)
        self.add("bytes_remote", (rows - own) * per_row)
        self.add("bytes_internode", float(rows_by_rank[self.other_node()].sum()) * per_row)
        self.account_baseline(base_by_rank, width, element_size, backward)

    def account_baseline(self, base_by_rank: torch.Tensor, width: int, element_size: int, backward: bool) -> None:
        """What today's dispatch moves: every (token, expert) copy in the input dtype, both ways."""
        base_row = 2 * width * element_size * (2 if backward else 1)
        base, base_own = float(base_by_rank.sum()), float(base_by_rank[self.ep_rank])
        self.add("baseline_bytes", base * base_row)
        self.add("baseline_remote", (base - base_own) * base_row)
        self.add("baseline_internode", float(base_by_rank[self.other_node()].sum()) * base_row)
