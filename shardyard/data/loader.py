"""Resumable, rank-sharded training loader over a byte array (torchdata StatefulDataLoader).

The data position is GLOBAL, so a run can resume on a different number of workers without
skipping or repeating a window. Each epoch a seeded permutation orders all non-overlapping windows;
every micro-batch step takes the next `world * batch_size` windows of it, rank r the r-th block of
`batch_size`. The position `{epoch, pos}` (windows of the epoch consumed by all ranks together) is
the same on every rank; a loader restored from it at any world size continues at that window.
An epoch's tail shorter than one global batch is skipped (the next epoch reshuffles everything).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from shardyard import envvars


class GlobalWindowStream(IterableDataset):
    """Yields this rank's (input, target) int64 pairs of length seq_len, from windows of seq_len + 1 bytes."""

    def __init__(
        self, data: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int, seed: int, ledger: bool = True
    ) -> None:
        super().__init__()
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.num_windows = (len(data) - 1) // seq_len
        if self.num_windows < world * batch_size:
            raise ValueError(
                f"{self.num_windows} windows of {seq_len} bytes cannot fill one batch of {batch_size} on {world} ranks"
            )
        self.epoch = 0
        self.pos = 0  # windows of this epoch's order consumed by all ranks together
        self.taken = 0  # windows of the current global batch this rank has yielded
        directory = os.environ.get(envvars.SAMPLE_LEDGER) if ledger else None  # test hook: windows trained on
        self.ledger = Path(directory) / f"rank{rank}-world{world}.txt" if directory else None

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.world * self.batch_size
        while True:
            order = self._order()
            while self.pos + span <= len(order):
                window_id = int(order[self.pos + self.rank * self.batch_size + self.taken])
                self.taken += 1
                if self.taken == self.batch_size:  # state after this sample: the next global batch
                    self.pos, self.taken = self.pos + span, 0
                if self.ledger is not None:
                    with open(self.ledger, "a") as f:
                        f.write(f"{self.epoch} {window_id}\n")
                start = window_id * self.seq_len
                window = torch.from_numpy(self.data[start : start + self.seq_len + 1].astype(np.int64))
                yield window[:-1], window[1:]
            self.epoch, self.pos, self.taken = self.epoch + 1, 0, 0

    def position(self) -> dict[str, int]:
        """The global position: identical on every rank between steps, valid at any world size."""
        if self.taken:
            raise RuntimeError("the data position is only global between steps (a batch is half consumed)")
        return {"epoch": self.epoch, "pos": self.pos}

    def set_position(self, position: dict[str, Any]) -> None:
        self.epoch, self.pos, self.taken = int(position["epoch"]), int(position["pos"]), 0


class TrainLoader:
    """Batches of this rank's windows; `position()` / `set_position()` are the resumable global state."""

    def __init__(self, stream: GlobalWindowStream) -> None:
        self.stream = stream
        self.loader = StatefulDataLoader(stream, batch_size=stream.batch_size, num_workers=0)
        self._iter: Iterator | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def position(self) -> dict[str, int]:
        return self.stream.position()

    def set_position(self, position: dict[str, Any]) -> None:
        self.stream.set_position(position)
        self._iter = None  # the next batch starts from the restored position


def build_train_loader(
    data: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int, seed: int, ledger: bool = True
) -> TrainLoader:
    return TrainLoader(GlobalWindowStream(data, seq_len, batch_size, rank, world, seed, ledger))
