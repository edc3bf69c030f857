"""Multiscale byte language model: N transformer stages, global -> ... -> local (MEGABYTE, MBLM).

Stage i sees sequences of `patch_size[i]` positions. A position of stage i is a *unit* of
U_i = prod(patch_size[i+1:]) bytes: the global stage's units are the top-level patches, the local
(last) stage's units are single bytes. The context is prod(patch_size) bytes.

For a byte sequence y of length T (padded at the end to a multiple of U_0):
  * unit embeddings: bytes are embedded at the local width; stage i's unit embedding is a linear map
    of the concatenated embeddings of its patch_size[i+1] sub-units (the MEGABYTE patch embedder,
    applied level by level);
  * stage 0 runs over its units shifted right by one, a learned pad first;
  * stage i > 0 runs once per unit of stage i-1 (a batch of B * T / U_{i-1} short sequences): its
    inputs are the sub-unit embeddings shifted right by one inside the parent unit (a learned pad
    first) plus a projection of the parent's output for that unit, split per position;
  * the last stage's output goes through a linear head to 256 byte logits.
Everything a prediction for byte t reads lies strictly before t, so the model is causal. Padding is
done on embeddings (zeros after the end, learned pads in front), never with a byte value, so byte 0 is
ordinary data.

`forward(idx, targets)` follows the registry contract: logits[:, t] predicts idx[t + 1] (= targets[t])
from idx[: t + 1]. The model's sequence is idx[1:] (= targets), so idx[0] only fixes the alignment.

Each stage can run under activation checkpointing in chunks of its batch of sequences (the MBLM
trick): only the chunk boundaries are kept, and one chunk's activations are rebuilt in backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.models.moe.accounting import checkpointed
from shardyard.models.transformer import FFNFactory, TransformerStack, init_weights, scale_residual_projections


@dataclass(frozen=True)
class StageDims:
    width: int
    depth: int
    heads: int
    patch_size: int
    checkpoint_chunks: int = 0  # 0 = off; n = checkpoint the stage in n chunks of its batch


class MultiscaleByteLM(nn.Module):
    vocab_size = 256

    def __init__(
        self, stages: Sequence[StageDims], ffn_factories: Sequence[FFNFactory], global_len: int | None = None
    ) -> None:
        """`ffn_factories[i]` builds stage i's feed-forward layers (dense or MoE) by block index.
        `global_len` overrides the global stage's longest sequence (default: its patch_size)."""
        super().__init__()
        if len(stages) < 2 or len(ffn_factories) != len(stages):
            raise ValueError("a multiscale model needs >= 2 stages and one FFN factory per stage")
        self.dims = list(stages)
        n = len(self.dims)
        sizes = [s.patch_size for s in self.dims]
        self.units = [math.prod(sizes[i + 1 :]) for i in range(n)]  # bytes per unit of stage i
        self.global_len = global_len or sizes[0]
        self.context = self.global_len * self.units[0]
        widths = [s.width for s in self.dims]

        self.embed = nn.Embedding(self.vocab_size, widths[-1])
        # patch_embed[i]: concatenated sub-unit embeddings of stage i+1 -> one unit of stage i
        self.patch_embed = nn.ModuleList(
            nn.Linear(sizes[i + 1] * widths[i + 1], widths[i], bias=False) for i in range(n - 1)
        )
        self.pads = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths)
        self.stacks = nn.ModuleList(
            TransformerStack(s.width, s.depth, s.heads, ffn_factories[i], self.global_len if i == 0 else s.patch_size)
            for i, s in enumerate(self.dims)
        )
        # to_next[i]: stage i's output for a unit -> context for each of stage i+1's positions in it
        self.to_next = nn.ModuleList(
            nn.Linear(widths[i], sizes[i + 1] * widths[i + 1], bias=False) for i in range(n - 1)
        )
        self.head = nn.Linear(widths[-1], self.vocab_size, bias=False)

        self.apply(init_weights)
        for pad in self.pads:
            nn.init.normal_(pad, std=0.02)
        for stage, stack in zip(self.dims, self.stacks):
            scale_residual_projections(stack, stage.depth)

    # ------------------------------------------------------------------------------------- pieces
    def unit_embeddings(self, byte_emb: torch.Tensor, level: int) -> list[torch.Tensor]:
        """byte_emb [B, S, d_last] (S a multiple of U_level) -> [emb_level, ..., emb_last], emb_i of
        shape [B, S / U_i, d_i]: each unit embedded from its sub-units' concatenated embeddings."""
        out = [byte_emb]
        for i in range(len(self.dims) - 2, level - 1, -1):
            finer, size = out[0], self.dims[i + 1].patch_size
            grouped = finer.reshape(finer.shape[0], finer.shape[1] // size, size * finer.shape[-1])
            out.insert(0, self.patch_embed[i](grouped))
        return out

    def embed_units(self, byte_ids: torch.Tensor, level: int) -> torch.Tensor:
        """byte_ids [B, k * U_level] -> stage `level` embeddings of those k units, [B, k, d_level]."""
        return self.unit_embeddings(self.embed(byte_ids), level)[0]

    def context_for(self, level: int, parent_out: torch.Tensor) -> torch.Tensor:
        """Stage level-1 output for units [..., d] -> stage `level` context [..., patch_size, d_level]."""
        ctx = self.to_next[level - 1](parent_out)
        return ctx.view(*parent_out.shape[:-1], self.dims[level].patch_size, self.dims[level].width)

    def shift_in(self, level: int, emb: torch.Tensor) -> torch.Tensor:
        """[N, L, d] unit embeddings -> inputs shifted right by one, the learned pad first."""
        pad = self.pads[level].to(emb.dtype).expand(emb.shape[0], 1, -1)
        return torch.cat((pad, emb[:, :-1]), dim=1)

    # ------------------------------------------------------------------------------------ forward
    def predict(self, seq: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [B, length, 256]: position t predicts seq[:, t] from seq[:, :t]. `seq` [B, S] holds
        the known bytes (S >= length - 1; bytes at positions >= length - 1 are never read)."""
        b, n = seq.shape[0], len(self.dims)
        patches = -(-length // self.units[0])
        if patches > self.global_len:
            raise ValueError(
                f"sequence of {length} bytes exceeds the model's context of {self.context} bytes "
                f"({self.global_len} global positions x {self.units[0]} bytes)"
            )
        padded = patches * self.units[0]
        known = seq[:, : min(seq.shape[1], length - 1, padded)]
        emb = F.pad(self.embed(known), (0, 0, 0, padded - known.shape[1]))  # zeros: never read
        embs = self.unit_embeddings(emb, 0)

        out = self._run_stage(0, self.shift_in(0, embs[0]))
        for i in range(1, n):
            d, size = self.dims[i].width, self.dims[i].patch_size
            x = self.shift_in(i, embs[i].reshape(-1, size, d)) + self.context_for(i, out).reshape(-1, size, d)
            out = self._run_stage(i, x)
        return self.head(out.reshape(b, padded, -1)[:, :length])

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: [B, T] byte values. Returns logits [B, T, 256] (logits[:, t] predicts
        idx[t + 1]) and the mean cross-entropy in nats against targets."""
        logits = self.predict(idx[:, 1:], idx.shape[1])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))
        return logits, loss

    # ----------------------------------------------------------------------- chunked checkpointing
    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage i; with checkpoint_chunks n, under activation checkpointing in n chunks of its
        batch of patches (each chunk's MoE layers carry its share of the aux loss)."""
        stack, chunks = self.stacks[i], self.dims[i].checkpoint_chunks
        if chunks == 0 or not torch.is_grad_enabled():
            return stack(x)
        pieces = x.tensor_split(min(chunks, x.shape[0]))
        return torch.cat([checkpointed(stack, piece, weight=piece.shape[0] / x.shape[0]) for piece in pieces])
