"""Low-rank feed-forward layers: W ~ U V with an optional self-guided dense warm start.

LowRankLinear(in, out, rank) holds U [out, r] and V [r, in] and computes x V^T U^T: r * (in + out)
weights and FLOPs per token instead of in * out. It is initialised from the truncated SVD of a
dense init W0 ~ N(0, std^2): U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T, the best rank-r approximation
of W0 with the scale split evenly between the factors.

Self-guided training: with `self_guided > 0` each layer also holds a dense guide G [out, in] and
computes alpha * x G^T + (1 - alpha) * x V^T U^T, with alpha falling from 1 to 0 (cosine) over the
first `self_guided` fraction of training; the trainer sets it with `set_lowrank_progress(model,
fraction)` each step. The guide lets early training use the full-rank path while the factors learn
from the same loss, then hands over. After the hand-over the guide's matmul is skipped; a zero term
0 * G.sum() keeps it in the autograd graph so DDP needs no find_unused_parameters.

`LowRankSwiGLU.merge()` returns an equivalent dense `SwiGLU` (W = U V) for inference;
`merge_lowrank(model)` swaps every LowRankSwiGLU in a model for its merged form. Merging pays
off in latency (one GEMM instead of two) while rank > in*out/(in+out); below that the factored
form is cheaper in FLOPs too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.models.transformer import SwiGLU


def guide_weight(fraction: float, self_guided: float) -> float:
    """alpha: 1 at the start, cosine down to 0 at `self_guided` of training (0 = no guide)."""
    if self_guided <= 0 or fraction >= self_guided:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * max(0.0, fraction) / self_guided))


class LowRankLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, rank: int, std: float = 0.02, self_guided: float = 0.0
    ) -> None:
        super().__init__()
        if not 0 < rank < min(in_features, out_features):
            raise ValueError(f"rank {rank} must lie in (0, min({in_features}, {out_features}))")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.self_guided = self_guided
        dense = torch.randn(out_features, in_features) * std
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        root = s[:rank].sqrt()
        self.u = nn.Parameter((u[:, :rank] * root).contiguous())
        self.v = nn.Parameter((root[:, None] * vh[:rank]).contiguous())
        self.guide: nn.Parameter | None = nn.Parameter(dense) if self_guided > 0 else None
        self.register_buffer("alpha", torch.tensor(1.0 if self_guided > 0 else 0.0), persistent=True)

    def set_progress(self, fraction: float) -> None:
        self.alpha.fill_(guide_weight(fraction, self.self_guided))

    def dense_weight(self) -> torch.Tensor:
        """The effective [out, in] weight: alpha * G + (1 - alpha) * U V."""
        w = self.u @ self.v
        if self.guide is not None and float(self.alpha) > 0:
            a = float(self.alpha)
            w = a * self.guide + (1 - a) * w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.v), self.u)
        if self.guide is None:
            return low
        a = float(self.alpha)
        if a <= 0:
            return low + 0.0 * self.guide.sum()
        return a * F.linear(x, self.guide) + (1 - a) * low

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, self_guided={self.self_guided}"


class LowRankSwiGLU(nn.Module):
    """SwiGLU FFN whose gate/up and down projections are LowRankLinear of the given rank."""

    def __init__(
        self,
        width: int,
        hidden: int,
        rank: int,
        self_guided: float = 0.0,
        std: float = 0.02,
        down_std: float | None = None,
    ) -> None:
        super().__init__()
        self.width, self.hidden = width, hidden
        self.gate_up = LowRankLinear(width, 2 * hidden, rank, std, self_guided)
        self.down = LowRankLinear(hidden, width, rank, down_std if down_std is not None else std, self_guided)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def set_progress(self, fraction: float) -> None:
        self.gate_up.set_progress(fraction)
        self.down.set_progress(fraction)

    @torch.no_grad()
    def merge(self) -> SwiGLU:
        """An equivalent dense SwiGLU (same outputs up to float rounding) for inference."""
        dense = SwiGLU(self.width, self.hidden).to(self.gate_up.u.device, self.gate_up.u.dtype)
        dense.gate_up.weight.copy_(self.gate_up.dense_weight())
        dense.down.weight.copy_(self.down.dense_weight())
        return dense


def set_lowrank_progress(model: nn.Module, fraction: float) -> None:
    """Tell every low-rank layer how far training is (0..1): drives the self-guided blend."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.set_progress(fraction)


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every LowRankSwiGLU inside `model` (in place) by its merged dense SwiGLU."""
    for name, child in list(model.named_children()):
        if isinstance(child, LowRankSwiGLU):
            setattr(model, name, child.merge())
        else:
            merge_lowrank(child)
    return model
