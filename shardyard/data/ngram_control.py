"""Byte n-gram control variates: a tighter validation figure from fewer windows.

How hard a window is to predict varies far more between windows (indentation runs vs dense
identifiers vs prose in docstrings) than the model's skill does, and a byte n-gram model fitted on
the training split sees the same variation. Its bits per byte on a window is a *control variate*:
known exactly for every possible window of the held-out text (a cumulative sum), so the model's
sampled mean can be corrected by how far the sample's n-gram mean strays from the text's
(the regression estimator, Cochran 1977, ch. 7):

    bpb = mean(y) + b . (X - mean(x)),    b = the least-squares slope of y on x over the windows,

with x a window's n-gram bits per byte for orders 1..3 and X their means over every window start.
Its standard error is that of the regression residuals, sqrt(1 - R^2) of the plain one: on the
stdlib held-out split R^2 is 0.74-0.92, i.e. the same standard error from 4-12x fewer windows
(`benchmarks/eval_stderr.py` checks it against the spread of the design itself).

The n-gram tables are counts over a fixed, evenly spaced sample of the training split (at most 8 MiB),
smoothed additively; trigram keys are hashed into 2^22 slots. Bytes only: a tokenizer's vocabulary
makes the tables too large, and those runs keep the plain estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDERS = 3
SAMPLE_BYTES = 8 << 20
SAMPLE_CHUNKS = 16
TRIGRAM_SLOTS = 1 << 22
SMOOTHING = 0.01


def _training_sample(train: object, limit: int = SAMPLE_BYTES, chunks: int = SAMPLE_CHUNKS) -> list[np.ndarray]:
    """Evenly spaced chunks of the training tokens (np.ndarray or ShardedTokens), at most `limit` in all."""
    length = len(train)  # type: ignore[arg-type]
    if length <= limit:
        return [np.asarray(train[0:length], dtype=np.int64)]  # type: ignore[index]
    size = limit // chunks
    starts = np.linspace(0, length - size, chunks).astype(np.int64)
    return [np.asarray(train[int(s) : int(s) + size], dtype=np.int64) for s in starts]  # type: ignore[index]


def _trigram_slot(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((a * 65536 + b * 256 + c) * 2654435761) % TRIGRAM_SLOTS


@dataclass(frozen=True)
class NGramControl:
    """Byte counts of a training sample: unigram, bigram (exact) and trigram (hashed)."""

    unigram: np.ndarray  # float64 [256]
    bigram: np.ndarray  # float64 [65536], index a * 256 + b
    trigram: np.ndarray  # float32 [TRIGRAM_SLOTS], index _trigram_slot(a, b, c)

    @staticmethod
    def fit(train: object, sample_bytes: int = SAMPLE_BYTES) -> NGramControl:
        uni = np.zeros(256)
        bi = np.zeros(65536)
        tri = np.zeros(TRIGRAM_SLOTS)
        for chunk in _training_sample(train, sample_bytes):
            uni += np.bincount(chunk, minlength=256)
            if len(chunk) > 1:
                bi += np.bincount(chunk[:-1] * 256 + chunk[1:], minlength=65536)
            if len(chunk) > 2:
                tri += np.bincount(_trigram_slot(chunk[:-2], chunk[1:-1], chunk[2:]), minlength=TRIGRAM_SLOTS)
        return NGramControl(uni, bi, tri.astype(np.float32))

    def byte_bits(self, data: np.ndarray) -> np.ndarray:
        """float64 [len(data), ORDERS]: each byte's bits under the order-1..3 models, earlier bytes as
        context (the first bytes of the text fall back to the lower orders)."""
        d = np.asarray(data, dtype=np.int64)
        out = np.empty((len(d), ORDERS))
        out[:, 0] = -np.log2((self.unigram[d] + 1.0) / (self.unigram.sum() + 256.0))
        out[:, 1] = out[:, 0]
        out[:, 2] = out[:, 0]
        if len(d) > 1:
            first = self.bigram.reshape(256, 256).sum(axis=1)  # times each byte had a successor
            pair = self.bigram[d[:-1] * 256 + d[1:]]
            out[1:, 1] = -np.log2((pair + SMOOTHING) / (first[d[:-1]] + 256 * SMOOTHING))
            out[1, 2] = out[1, 1]
        if len(d) > 2:
            triple = self.trigram[_trigram_slot(d[:-2], d[1:-1], d[2:])].astype(np.float64)
            context = self.bigram[d[:-2] * 256 + d[1:-1]]
            out[2:, 2] = -np.log2((triple + SMOOTHING) / (context + 256 * SMOOTHING))
        return out

    def window_controls(self, data: np.ndarray, starts: np.ndarray, seq_len: int) -> WindowControls:
        """The n-gram bits per byte of the targets of each window starting at `starts` (bytes start + 1 ..
        start + seq_len), and their mean over every window start of `data` (0 .. len - seq_len - 1): the
        population the windows sample."""
        cumulative = np.zeros((len(data) + 1, ORDERS))
        np.cumsum(self.byte_bits(data), axis=0, out=cumulative[1:])
        every = np.arange(len(data) - seq_len)
        means = ((cumulative[every + 1 + seq_len] - cumulative[every + 1]) / seq_len).mean(axis=0)
        starts = np.asarray(starts, dtype=np.int64)
        values = (cumulative[starts + 1 + seq_len] - cumulative[starts + 1]) / seq_len
        return WindowControls(values, means)


@dataclass(frozen=True)
class WindowControls:
    """Control variates of a rank's validation windows, in the order its batches hold them."""

    values: np.ndarray  # float64 [windows, ORDERS]
    means: np.ndarray  # float64 [ORDERS]: over every window start of the text
