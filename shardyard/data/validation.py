"""Validation windows: a deterministic, representative sample of a held-out byte stream.

A held-out split is the concatenation of whole files. Reading its first few windows measures the
first file or two; here the windows are a *systematic sample* of the whole stream instead: n
windows of seq_len + 1 bytes whose starts lie `stride = span / n` bytes apart from one seeded
offset. Every file then holds floor or ceil of (its bytes / stride) window starts, i.e. it is
represented in proportion to its size (files shorter than the stride are hit with probability
size / stride), and the sample does not change from run to run.

The offset comes from a fixed seed, not the job's: every job on the same data scores the *same*
windows, so two models' numbers can be compared window by window.

n = training.eval_bytes // seq_len (scored bytes per window = seq_len), capped at the
non-overlapping windows the stream holds, rounded down to a multiple of the world size. Window i
goes to rank i % world: equal counts on every rank (evaluation of an expert-parallel model is
collective: every rank must run the same number of forward passes), and each rank's share spans
the whole stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shardyard.data.corpus import ByteCorpus, resolve_files
from shardyard.data.ngram_control import NGramControl, WindowControls
from shardyard.platform.errors import UserError
from shardyard.platform.schema import DataSpec

WINDOW_SEED = 20261125  # fixed: the same windows for every job on the same data


@dataclass(frozen=True)
class HeldOutText:
    """A byte stream to evaluate on and where each of its files starts."""

    data: np.ndarray  # uint8
    file_offsets: np.ndarray  # int64, ascending, first 0


def held_out_split(corpus: ByteCorpus) -> HeldOutText:
    return HeldOutText(corpus.val, corpus.val_offsets)


def load_text(paths: list[str], extensions: list[str], field: str = "--data") -> HeldOutText:
    """Every file under `paths` (files, directories with `extensions`, globs, 'stdlib'), concatenated
    in sorted order. Nothing is held out of it: the whole text is for evaluation."""
    try:
        files = [f for f, _ in resolve_files(DataSpec(paths=paths, extensions=extensions))]
    except UserError as err:
        raise UserError(f"{field}: {err}") from None
    sizes = np.array([f.stat().st_size for f in files], dtype=np.int64)
    data = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files]) if files else np.zeros(0, np.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return HeldOutText(data, offsets[sizes > 0] if (sizes > 0).any() else np.zeros(1, np.int64))


def window_count(length: int, seq_len: int, eval_bytes: int, world: int) -> int:
    """Windows to evaluate (a multiple of `world`): eval_bytes // seq_len, at most what fits without overlap."""
    capacity = (length - 1) // seq_len
    return min(capacity, max(1, eval_bytes // seq_len)) // world * world


def select_windows(length: int, seq_len: int, eval_bytes: int, world: int, seed: int = WINDOW_SEED) -> np.ndarray:
    """Window starts for every rank, shape [world, windows per rank] (row r is rank r's share).

    Starts are `offset + i * stride` (floored), stride = max(seq_len, span / n) with span the number
    of valid starts, and the seeded offset uniform over the slack the stride leaves, so the last
    window ends inside the stream and windows never overlap."""
    n = window_count(length, seq_len, eval_bytes, world)
    if n == 0:
        raise ValueError(
            f"a stream of {length} bytes holds {(length - 1) // seq_len} windows of "
            f"{seq_len + 1} bytes, fewer than the {world} ranks that must share them"
        )
    span = length - seq_len  # valid starts: 0 .. span - 1
    stride = max(float(seq_len), span / n)
    slack = span - (n - 1) * stride  # >= 1
    offset = np.random.default_rng(seed).random() * slack
    starts = np.floor(offset + np.arange(n) * stride).astype(np.int64)
    return starts.reshape(n // world, world).T.copy()


def windows_per_file(starts: np.ndarray, file_offsets: np.ndarray) -> np.ndarray:
    """How many window starts fall in each file (for coverage reports and tests)."""
    owner = np.searchsorted(file_offsets, np.asarray(starts).ravel(), side="right") - 1
    return np.bincount(owner, minlength=len(file_offsets))


def batch_windows(
    data: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) int64 batches of at most `batch_size` windows, in the order of `starts`."""
    batches = []
    for i in range(0, len(starts), batch_size):
        block = np.stack([data[s : s + seq_len + 1] for s in starts[i : i + batch_size]]).astype(np.int64)
        block_t = torch.from_numpy(block)
        batches.append((block_t[:, :-1], block_t[:, 1:]))
    return batches


def rank_batches(
    text: HeldOutText, seq_len: int, eval_bytes: int, batch_size: int, rank: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches: its share of the windows selected for the whole world."""
    starts = select_windows(len(text.data), seq_len, eval_bytes, world)
    return batch_windows(text.data, starts[rank], seq_len, batch_size)


def rank_controls(
    text: HeldOutText, seq_len: int, eval_bytes: int, rank: int, world: int, control: NGramControl | None
) -> WindowControls | None:
    """The n-gram control variates of this rank's windows (None without a control model)."""
    if control is None:
        return None
    starts = select_windows(len(text.data), seq_len, eval_bytes, world)
    return control.window_controls(text.data, starts[rank], seq_len)


def all_controls(
    text: HeldOutText, seq_len: int, eval_bytes: int, world: int, control: NGramControl | None
) -> WindowControls | None:
    """Every rank's window controls in `all_batches` order."""
    if control is None:
        return None
    starts = select_windows(len(text.data), seq_len, eval_bytes, world)
    return control.window_controls(text.data, starts.ravel(), seq_len)


def all_batches(
    text: HeldOutText, seq_len: int, eval_bytes: int, batch_size: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's windows, evaluated in one process: the same window set a `world`-rank job scores."""
    starts = select_windows(len(text.data), seq_len, eval_bytes, world)
    return batch_windows(text.data, starts.ravel(), seq_len, batch_size)


def eval_set_texts(
    eval_sets: dict[str, list[str]], extensions: list[str], seq_len: int, world: int
) -> dict[str, HeldOutText]:
    """training.eval_sets loaded by name; each must hold at least one window per rank."""
    texts = {}
    for name, paths in eval_sets.items():
        text = load_text(paths, extensions, field=f"training.eval_sets.{name}")
        if (len(text.data) - 1) // seq_len < world:
            raise UserError(
                f"training.eval_sets.{name}: {len(text.data)} bytes hold fewer than {world} windows of "
                f"data.seq_len + 1 = {seq_len + 1} bytes (one per worker)"
            )
        texts[name] = text
    return texts
