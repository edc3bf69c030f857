"""Byte n-gram control variates: per-window values and population means against direct loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shardyard.data.ngram_control import SMOOTHING, NGramControl


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).copy()


TRAIN = _bytes(b"for item in items:\n    total += item.price * item.count\nreturn total\n" * 50)


def test_byte_bits_are_the_smoothed_ngram_probabilities() -> None:
    control = NGramControl.fit(TRAIN)
    text = _bytes(b"total += item\nzq")
    bits = control.byte_bits(text)
    train = TRAIN.tolist()
    uni = {b: train.count(b) for b in range(256)}
    pairs: dict[tuple[int, int], int] = {}
    triples: dict[tuple[int, int, int], int] = {}
    for i in range(len(train) - 1):
        pairs[train[i], train[i + 1]] = pairs.get((train[i], train[i + 1]), 0) + 1
    for i in range(len(train) - 2):
        key = (train[i], train[i + 1], train[i + 2])
        triples[key] = triples.get(key, 0) + 1
    firsts = {a: sum(c for (x, _), c in pairs.items() if x == a) for a in range(256)}
    t = text.tolist()
    for i, c in enumerate(t):
        assert bits[i, 0] == pytest.approx(-math.log2((uni[c] + 1) / (len(train) + 256)))
        if i >= 1:
            p = (pairs.get((t[i - 1], c), 0) + SMOOTHING) / (firsts[t[i - 1]] + 256 * SMOOTHING)
            assert bits[i, 1] == pytest.approx(-math.log2(p))
        if i >= 2:  # hashed, but this little text has no collisions
            p = (triples.get((t[i - 2], t[i - 1], c), 0) + SMOOTHING) / (
                pairs.get((t[i - 2], t[i - 1]), 0) + 256 * SMOOTHING
            )
            assert bits[i, 2] == pytest.approx(-math.log2(p), rel=1e-6)
    assert bits[-1, 2] >= 8 - 1e-9 and bits[3, 2] < 1  # unseen: uniform (8 bits); frequent: little


def test_window_controls_against_direct_sums() -> None:
    control = NGramControl.fit(TRAIN)
    text = _bytes(bytes(range(40, 120)) + b"    return total\n" * 8)
    seq = 16
    starts = np.array([0, 5, 33, len(text) - seq - 1])
    got = control.window_controls(text, starts, seq)
    bits = control.byte_bits(text)
    for row, s in enumerate(starts):
        assert np.allclose(got.values[row], bits[s + 1 : s + 1 + seq].mean(axis=0))
    every = [bits[s + 1 : s + 1 + seq].mean(axis=0) for s in range(len(text) - seq)]
    assert np.allclose(got.means, np.mean(every, axis=0))


def test_fit_samples_long_training_streams_evenly() -> None:
    long = np.tile(TRAIN, 400)  # ~28 KB
    control = NGramControl.fit(long, sample_bytes=4096)
    assert control.unigram.sum() == 4096 and control.bigram.sum() == 16 * 255  # 16 chunks of 256 bytes
    whole = NGramControl.fit(TRAIN, sample_bytes=4096)  # shorter than the sample: all of it
    assert whole.unigram.sum() == len(TRAIN)
