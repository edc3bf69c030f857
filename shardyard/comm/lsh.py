"""LSH-MoE centroids (Nie et al., NeurIPS 2024): rows bound for one expert that hash alike travel as
their mean, and each row gets back E(c) + (x - c) (residual error compensation). See docs/lsh.md.

Hashing is cross-polytope LSH (Andoni et al. 2015): for a random matrix R [width, m] with i.i.d.
N(0, 1) entries, h(x) = argmax over the 2m signed coordinates [Rx, -Rx] (2m buckets). `hashes` such
functions are ANDed: the bucket id is the tuple of their values, so more hashes mean finer buckets.
The matrices come from a CPU generator seeded by (seed, layer, epoch), so every rank draws the same
ones without communicating, and `epoch = training micro-batches // rotation_refresh` is all the state
a checkpoint needs (kept in the persistent buffer `forwards`).

Compression and its inverse are whole-tensor index operations (unique, index_add, index_select); no
Python loop over rows. The backward is autograd's through those operations: the exact gradient of
the compressed forward with bucket memberships held fixed (they are piecewise constant in x):

    dL/dx_i = g_i - mean_{j in b(i)} g_j + (1 / n_b) J_E(c_b)^T sum_{j in b(i)} g_j

i.e. the bucket-mean of the output gradients goes through the expert's Jacobian at the centroid
(one row per bucket crosses the wire, compressed like the forward) and each row's deviation from
that mean passes through the residual's identity. With one row per bucket it is the exact gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def rotation(seed: int, layer: int, epoch: int, width: int, hashes: int, half: int) -> torch.Tensor:
    """[width, hashes * half] float32 Gaussian matrix, identical on every rank for the same arguments."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + epoch * 101 + 17) % (2**63 - 1))
    return torch.randn(width, hashes * half, generator=g)


def bucket_codes(x: torch.Tensor, rot: torch.Tensor, hashes: int, half: int) -> torch.Tensor:
    """[M, hashes] int64: the cross-polytope value of every row under each hash function."""
    proj = (x.detach().float() @ rot[:, : hashes * half].to(x.device)).view(-1, hashes, half)
    return torch.cat([proj, -proj], dim=2).argmax(dim=2)


@dataclass
class Centroids:
    rows: torch.Tensor  # [C, width] the mean of each non-empty bucket, grouped like the input rows
    counts: torch.Tensor  # [groups] int64 centroids per group (expert)
    inverse: torch.Tensor  # [M] int64 the centroid of every input row
    members: torch.Tensor  # [C] int64 rows per centroid


def bucket_ids(
    group_of: torch.Tensor, codes: torch.Tensor, num_groups: int, buckets_per_hash: int
) -> tuple[torch.Tensor, int]:
    """(inverse [M] into C distinct (group, codes) keys, C); keys ordered by their first row."""
    m, hashes = codes.shape
    bits = math.ceil(math.log2(max(num_groups, 2))) + hashes * math.ceil(math.log2(buckets_per_hash))
    if bits <= 62:  # one int64 key per row: a 1-D unique is much cheaper than unique(dim=0)
        key = group_of.clone()
        for i in range(hashes):
            key = key * buckets_per_hash + codes[:, i]
        _, inverse = torch.unique(key, return_inverse=True)
    else:
        _, inverse = torch.unique(torch.cat([group_of[:, None], codes], 1), dim=0, return_inverse=True)
    num = int(inverse.max()) + 1 if m else 0
    # renumber by first occurrence: the centroids keep the rows' order (and their grouping)
    first = torch.full((num,), m, dtype=torch.int64, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(m, device=inverse.device), reduce="amin")
    new_id = torch.empty_like(first)
    new_id[torch.argsort(first)] = torch.arange(num, device=first.device)
    return new_id[inverse], num


def group_centered(x: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
    """x minus the mean of its group's rows (x grouped by group, group_counts rows each); no gradient."""
    groups = group_counts.numel()
    group_of = torch.repeat_interleave(
        torch.arange(groups, device=x.device), group_counts.to(x.device), output_size=x.shape[0]
    )
    x = x.detach().float()
    means = x.new_zeros(groups, x.shape[1]).index_add(0, group_of, x) / group_counts.clamp(min=1).to(x)[:, None]
    return x - means.index_select(0, group_of)


def compress(x: torch.Tensor, group_counts: torch.Tensor, codes: torch.Tensor, buckets_per_hash: int) -> Centroids:
    """Mean of the rows of every non-empty (group, bucket); x is grouped by group (group_counts rows each)."""
    groups = group_counts.numel()
    group_of = torch.repeat_interleave(
        torch.arange(groups, device=x.device), group_counts.to(x.device), output_size=x.shape[0]
    )
    inverse, num = bucket_ids(group_of, codes, groups, buckets_per_hash)
    members = torch.bincount(inverse, minlength=num)
    sums = x.new_zeros(num, x.shape[1]).index_add(0, inverse, x)
    rows = sums / members.unsqueeze(1).to(x.dtype)
    centroid_group = group_of.new_zeros(num).scatter_(0, inverse, group_of)
    return Centroids(rows, torch.bincount(centroid_group, minlength=groups), inverse, members)


class _Residual(torch.autograd.Function):
    """x - c_b(x) with c the bucket mean: backward g - mean_b(g) (the projection's exact Jacobian).

    Written out so that with one row per bucket the gradient is exactly zero (autograd through
    x - mean(x) would give g - g/1 only up to rounding, and break bit-equality with the plain path).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, centroids: torch.Tensor, inverse: torch.Tensor, members: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse, members)
        return x - centroids.index_select(0, inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inverse, members = ctx.saved_tensors
        mean = grad.new_zeros(members.numel(), grad.shape[1]).index_add_(0, inverse, grad)
        mean /= members.unsqueeze(1).to(grad.dtype)
        return grad - mean.index_select(0, inverse), None, None, None


def expand(
    expert_out: torch.Tensor, x: torch.Tensor, centroids: Centroids, residual: bool | str = True
) -> torch.Tensor:
    """Row i's output: E(c_b(i)) + (x_i - c_b(i)) (residual compensation), or E(c_b(i)) without it.

    residual "forward": the residual corrects the forward only and passes no gradient, so every row of a
    bucket gets the bucket's gradient, J_E(c_b)^T (mean of the bucket's output gradients), as without the
    residual; with True each row's deviation from that mean also flows back through the residual's identity.
    """
    inv = centroids.inverse
    if not residual:
        return expert_out.index_select(0, inv)
    if residual == "forward":
        return expert_out.index_select(0, inv) + (x - centroids.rows.index_select(0, inv)).detach()
    return expert_out.index_select(0, inv) + _Residual.apply(x, centroids.rows.detach(), inv, centroids.members)


class CentroidHasher(nn.Module):
    """Per-layer LSH state: the rotation schedule (persistent) and the adaptive number of hashes in use."""

    def __init__(
        self,
        width: int,
        layer: int,
        hashes: int,
        buckets_per_hash: int,
        rotation_refresh: int,
        target_ratio: float | None,
        error_every: int,
        seed: int,
        residual: bool | str = True,
        max_error: float | None = None,
        center: bool = True,
    ) -> None:
        super().__init__()
        if buckets_per_hash % 2 or buckets_per_hash < 2:
            raise ValueError(f"buckets_per_hash must be even and >= 2, got {buckets_per_hash}")
        self.width, self.layer, self.hashes = width, layer, hashes
        self.buckets_per_hash, self.half = buckets_per_hash, buckets_per_hash // 2
        self.rotation_refresh, self.target_ratio = rotation_refresh, target_ratio
        self.error_every, self.seed, self.residual = error_every, seed, residual
        self.max_error, self.center = max_error, center
        # Persistent: restored by a checkpoint, so a resumed run hashes exactly as the original would.
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))  # training micro-batches seen
        self.register_buffer("active_hashes", torch.tensor(hashes, dtype=torch.int64))
        self._rot: torch.Tensor | None = None
        self._rot_epoch = -1

    @property
    def epoch(self) -> int:
        return int(self.forwards) // self.rotation_refresh

    def matrix(self) -> torch.Tensor:
        epoch = self.epoch
        if self._rot is None or epoch != self._rot_epoch:
            self._rot = rotation(self.seed, self.layer, epoch, self.width, self.hashes, self.half)
            self._rot_epoch = epoch
        return self._rot

    def codes(self, x: torch.Tensor, group_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Bucket codes of x's rows; with `center` (and group_counts) of the rows minus their group's mean."""
        # clamped: a checkpoint written with more hashes than this spec has may be loaded
        active = max(1, min(int(self.active_hashes), self.hashes))
        if self.center and group_counts is not None:
            x = group_centered(x, group_counts)
        return bucket_codes(x, self.matrix(), active, self.half)

    def measure_now(self) -> bool:
        """Whether this (training) micro-batch also measures the error against the exact dispatch."""
        return self.error_every > 0 and int(self.forwards) % self.error_every == 0

    def advance(self, ratio: float | None) -> None:
        """Before a training micro-batch: count it; move the hashes in use toward target_ratio given the
        previous micro-batch's centroids / rows (None = no change)."""
        self.forwards += 1
        if self.target_ratio is None or ratio is None:
            return
        active = int(self.active_hashes)
        if ratio > self.target_ratio and active > 1:
            self.active_hashes.fill_(active - 1)
        elif ratio < self.target_ratio / 2 and active < self.hashes:
            self.active_hashes.fill_(active + 1)

    def steer_by_error(self, error: float) -> None:
        """After a measured micro-batch (max_error set): one hash function more when the error of the expert
        outputs relative to their spread is above max_error, one fewer when below half of it. `error` must be the same
        on every rank of the EP group (the caller all-reduces), so the hashes in use stay equal."""
        if self.max_error is None:
            return
        active = int(self.active_hashes)
        if error > self.max_error and active < self.hashes:
            self.active_hashes.fill_(active + 1)
        elif error < self.max_error / 2 and active > 1:
            self.active_hashes.fill_(active - 1)

    def extra_repr(self) -> str:
        return (
            f"hashes={self.hashes}, buckets_per_hash={self.buckets_per_hash}, "
            f"rotation_refresh={self.rotation_refresh}, target_ratio={self.target_ratio}, max_error={self.max_error}"
        )
