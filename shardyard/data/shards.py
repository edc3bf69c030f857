"""Token shards on disk and the array view training reads them through.

A prepared split is a run of fixed-size shard files (`<split>-00000.bin`, ...: raw little-endian
uint8 / uint16 / uint32, every shard `shard_tokens` long but the last). `ShardedTokens` memory-maps
them and behaves like one flat 1-D array for what the loader and the validation sampler do:
`len()` and contiguous slices `a[i:j]` (a slice across a shard boundary is copied together).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ShardedTokens:
    """A flat read-only token array over memory-mapped shards, optionally restricted to [start, stop)."""

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.shards = shards
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(self.bounds[-1])
        self.start = start
        self.stop = total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"range [{start}, {stop}) outside {total} tokens")
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint8)

    @staticmethod
    def open(paths: list[Path], dtype: np.dtype) -> ShardedTokens:
        return ShardedTokens(
            [np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype) for p in paths]
        )

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> ShardedTokens:
        """The sub-range [start, stop) of this view (no copy)."""
        return ShardedTokens(self.shards, self.start + start, self.start + stop)

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        lo, hi, _ = item.indices(len(self))
        lo, hi = self.start + lo, self.start + max(hi, lo)
        first = int(np.searchsorted(self.bounds, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            end = min(hi, int(self.bounds[first + 1]))
            offset = int(self.bounds[first])
            pieces.append(self.shards[first][lo - offset : end - offset])
            lo, first = end, first + 1
        if not pieces:
            return np.zeros(0, self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def to_numpy(self) -> np.ndarray:
        return np.asarray(self[0 : len(self)])
