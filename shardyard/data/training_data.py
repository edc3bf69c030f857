"""What a training worker reads: one facade over the byte cache (data.paths, bytes) and prepared shards.

`load_training_data(spec.data)` gives the training token stream, the held-out text, the vocabulary,
the bytes each token covers (bits per byte) and a fingerprint; `build_data_loader` the resumable,
rank-sharded loader over it (a weighted mixture when data.sources lists several sources). Workers
only memory-map: prepared data is made by `shardyard prepare` / before training on the driver; a
worker that finds none prepares it in one process under a lock (runs without a driver, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shardyard.data.loader import TrainLoader, build_train_loader
from shardyard.data.validation import HeldOutText
from shardyard.platform.errors import UserError
from shardyard.platform.schema import DataSpec


@dataclass
class TrainingData:
    train: Any  # 1-D token array: np.ndarray (bytes) or ShardedTokens (prepared)
    held_out: HeldOutText
    vocab_size: int
    token_bytes: np.ndarray | None  # int32 [vocab]: bytes each token covers; None = one byte per token
    bytes_per_token: float  # mean over the training split (1.0 for bytes)
    fingerprint: dict[str, Any]
    sources: list[tuple[str, float, Any]]  # (name, weight, that source's training tokens); one entry = no mixture
    prepared: Any = None  # PreparedData when read from prepared shards

    def describe(self) -> str:
        """One line for the log: tokens, bytes per token, mixture weights and token shares."""
        line = (
            f"data: {len(self.train):,} training tokens, {len(self.held_out.data):,} held-out, vocab "
            f"{self.vocab_size}, "
            f"{self.bytes_per_token:.3f} bytes/token"
        )
        if len(self.sources) > 1:
            total_w = sum(w for _, w, _ in self.sources)
            total_t = sum(len(t) for _, _, t in self.sources)
            line += "; mixture " + ", ".join(
                f"{name}: weight {w / total_w:.3f} (tokens {len(t) / total_t:.3f})" for name, w, t in self.sources
            )
        return line

    def encode_text(self, text: HeldOutText) -> HeldOutText:
        """An extra evaluation text (bytes) in this data's tokens (training.eval_sets)."""
        if self.prepared is None or self.prepared.tokenizer().is_bytes:
            return text
        tokenizer = self.prepared.tokenizer()
        bounds = list(text.file_offsets) + [len(text.data)]
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            doc = bytes(np.asarray(text.data[a:b]))
            try:
                pieces.append(tokenizer.encode([doc])[0])
            except UnicodeDecodeError:
                raise UserError("training.eval_sets: a text tokenizer needs UTF-8 evaluation files") from None
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return HeldOutText(
            np.concatenate(pieces), offsets[lengths > 0] if (lengths > 0).any() else np.zeros(1, np.int64)
        )


def load_training_data(data: DataSpec) -> TrainingData:
    if not data.prepared:
        from shardyard.data.corpus import load_corpus

        corpus = load_corpus(data)
        return TrainingData(
            corpus.train,
            HeldOutText(corpus.val, corpus.val_offsets),
            256,
            None,
            1.0,
            corpus.fingerprint(data.seq_len),
            [("corpus", 1.0, corpus.train)],
        )
    from shardyard.data.prepare import ensure_prepared

    prepared = ensure_prepared(data, parallel="local")  # normally done on the driver already
    need = data.seq_len + 1
    if len(prepared.train) < need or len(prepared.val) < need:
        raise UserError(
            f"data: prepared corpus too small for data.seq_len={data.seq_len}: {len(prepared.train)} training "
            f"and {len(prepared.val)} validation tokens (each needs at least {need})"
        )
    sources = [(name, weight, prepared.train.view(a, b)) for name, weight, a, b in prepared.source_ranges()]
    if data.sources is None or len(sources) == 1:
        sources = [(sources[0][0] if len(sources) == 1 else "corpus", 1.0, prepared.train)]
    for name, _, tokens in sources:
        if len(tokens) < need:
            raise UserError(
                f"data.sources: {name!r} holds {len(tokens)} training tokens, fewer than one window of "
                f"data.seq_len + 1 = {need}"
            )
    return TrainingData(
        prepared.train,
        HeldOutText(prepared.val, prepared.val_offsets()),
        prepared.vocab_size,
        prepared.token_bytes,
        prepared.bytes_per_token,
        prepared.fingerprint(data.seq_len),
        sources,
        prepared,
    )


def build_data_loader(
    data: TrainingData, seq_len: int, batch_size: int, rank: int, world: int, seed: int, ledger: bool = True
) -> TrainLoader:
    """The rank's resumable loader: global windows of the one stream, or the weighted mixture.
    `rank` / `world`: data-parallel coordinates; `ledger`: whether this rank writes the sample ledger
    test hook (one of the ranks reading the same batches)."""
    if len(data.sources) == 1:
        return build_train_loader(data.train, seq_len, batch_size, rank, world, seed, ledger)
    from shardyard.data.mixture import MixtureWindowStream

    stream = MixtureWindowStream(
        [t for _, _, t in data.sources], [w for _, w, _ in data.sources], seq_len, batch_size, rank, world, seed
    )
    return TrainLoader(stream)  # type: ignore[arg-type]  # the same position interface
