"""A weighted mixture of sources, honoured in every batch, with the loader's global resumable position.

The training stream is a sequence of *slots*; slot t is one window of one source. Which source is
fixed by a periodic schedule: over every PERIOD consecutive slots source i gets exactly n_i slots
(the weights apportioned by largest remainder), spread by the largest-deficit rule, so any run of
consecutive slots, i.e. any global batch, holds each source's share to within about one window.
The k-th slot of source i reads the (k mod windows_i)-th entry of source i's seeded permutation for
pass k // windows_i: a small source repeats while a large one has not finished a pass.

As in `GlobalWindowStream`, a global batch is the next world * batch_size slots and rank r takes the
r-th block of batch_size; the position {epoch: 0, pos: slots consumed by all ranks} is the same on
every rank and valid at any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

PERIOD = 4096


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Whole counts summing to `total`, proportional to `weights` (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def schedule(weights: list[float], period: int = PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each slot of a period, slots of each source per period, each slot's occurrence index
    within its source inside the period)."""
    counts = apportion(weights, period)
    taken = np.zeros(len(counts), dtype=np.int64)
    source_of = np.zeros(period, dtype=np.int64)
    occurrence = np.zeros(period, dtype=np.int64)
    for t in range(period):
        deficit = counts * (t + 1) / period - taken
        deficit[taken >= counts] = -np.inf
        i = int(np.argmax(deficit))
        source_of[t], occurrence[t] = i, taken[i]
        taken[i] += 1
    return source_of, counts, occurrence


class MixtureWindowStream(IterableDataset):
    """Yields this rank's (input, target) int64 pairs of seq_len tokens drawn from weighted sources."""

    def __init__(
        self, sources: list[Any], weights: list[float], seq_len: int, batch_size: int, rank: int, world: int, seed: int
    ) -> None:
        super().__init__()
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.num_windows = [(len(s) - 1) // seq_len for s in sources]
        for i, n in enumerate(self.num_windows):
            if n < 1:
                raise ValueError(f"source {i} holds {len(sources[i])} tokens: not one window of {seq_len + 1}")
        self.source_of, self.per_period, self.occurrence = schedule(weights)
        self.pos = 0  # slots consumed by all ranks together
        self.taken = 0  # slots of the current global batch this rank has yielded
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def slot(self, t: int) -> tuple[int, int]:
        """(source, window) of global slot t."""
        source = int(self.source_of[t % PERIOD])
        k = (t // PERIOD) * int(self.per_period[source]) + int(self.occurrence[t % PERIOD])
        n = self.num_windows[source]
        key = (source, k // n)
        if key not in self._orders:
            if len(self._orders) > 16:
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, source, k // n]).permutation(n)
        return source, int(self._orders[key][k % n])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.world * self.batch_size
        while True:
            source, window = self.slot(self.pos + self.rank * self.batch_size + self.taken)
            self.taken += 1
            if self.taken == self.batch_size:
                self.pos, self.taken = self.pos + span, 0
            start = window * self.seq_len
            tokens = torch.from_numpy(
                np.asarray(self.sources[source][start : start + self.seq_len + 1]).astype(np.int64)
            )
            yield tokens[:-1], tokens[1:]

    def position(self) -> dict[str, int]:
        if self.taken:
            raise RuntimeError("the data position is only global between steps (a batch is half consumed)")
        return {"epoch": 0, "pos": self.pos}

    def set_position(self, position: dict[str, Any]) -> None:
        self.pos, self.taken = int(position["pos"]), 0

    def shares(self, slots: int) -> np.ndarray:
        """Each source's share of the first `slots` slots (what the schedule delivered, for reports)."""
        counts = np.bincount([int(self.source_of[t % PERIOD]) for t in range(slots)], minlength=len(self.sources))
        return counts / max(slots, 1)
