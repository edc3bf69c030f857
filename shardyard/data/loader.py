"""Resumable, rank-sharded loaders over a byte array (torchdata StatefulDataLoader).

Training: each epoch a seeded permutation of non-overlapping window starts is split across ranks
(rank r takes order[r::world]); the dataset's state {epoch, pos} makes a restored loader yield
exactly the batches the interrupted one would have. Validation: a fixed, unshuffled slice.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader


class ShardedByteWindows(IterableDataset):
    """Yields (input, target) int64 pairs of length seq_len from windows of seq_len + 1 bytes."""

    def __init__(self, data: np.ndarray, seq_len: int, rank: int, world: int, seed: int) -> None:
        super().__init__()
        self.data = data
        self.seq_len = seq_len
        self.rank = rank
        self.world = world
        self.seed = seed
        self.num_windows = (len(data) - 1) // seq_len
        if self.num_windows < world:
            raise ValueError(f"{self.num_windows} windows of {seq_len} bytes cannot feed {world} ranks")
        self.epoch = 0
        self.pos = 0  # windows of this rank's epoch order already yielded

    def _rank_order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        usable = (len(order) // self.world) * self.world  # equal share on every rank
        return order[:usable][self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = self._rank_order()
            while self.pos < len(order):
                start = int(order[self.pos]) * self.seq_len
                self.pos += 1
                window = torch.from_numpy(self.data[start:start + self.seq_len + 1].astype(np.int64))
                yield window[:-1], window[1:]
            self.epoch += 1
            self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])


def build_train_loader(data: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int,
                       seed: int) -> StatefulDataLoader:
    dataset = ShardedByteWindows(data, seq_len, rank, world, seed)
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=0)


def validation_batches(data: np.ndarray, seq_len: int, batch_size: int, num_batches: int, rank: int,
                       world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first world * num_batches * batch_size validation windows (fewer if short)."""
    windows = (len(data) - 1) // seq_len
    wanted = min(windows, world * num_batches * batch_size) // world * world  # same count on every rank
    mine = list(range(rank, wanted, world))
    batches = []
    for i in range(0, len(mine), batch_size):
        starts = [w * seq_len for w in mine[i:i + batch_size]]
        block = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        batches.append((block[:, :-1], block[:, 1:]))
    return batches
