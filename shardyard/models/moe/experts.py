"""Experts stored as stacked [E, ...] weights so one grouped GEMM serves all of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.kernels import grouped_mm


class GroupedExperts(nn.Module):
    """E feed-forward experts (SwiGLU or GELU MLP) over tokens already sorted by expert."""

    def __init__(self, num_experts: int, width: int, hidden: int, kind: str = "swiglu",
                 backend: str = "auto") -> None:
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"unknown expert kind {kind!r}; available: swiglu, gelu")
        self.kind = kind
        self.backend = backend
        self.num_experts = num_experts
        up_width = 2 * hidden if kind == "swiglu" else hidden
        self.w_up = nn.Parameter(torch.empty(num_experts, width, up_width))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, width))
        nn.init.normal_(self.w_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02 / math.sqrt(2))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [M, width] grouped by expert; offsets: [E] int32 cumulative row ends."""
        h = grouped_mm(x_sorted, self.w_up, offsets, self.backend)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return grouped_mm(h, self.w_down, offsets, self.backend)
