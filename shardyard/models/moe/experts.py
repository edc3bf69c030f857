"""Experts stored as stacked [E, ...] weights so one grouped GEMM serves all of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.kernels import grouped_mm
from shardyard.models.transformer import GeluMLP, SwiGLU


class _SwiGLU(torch.autograd.Function):
    """silu(h[:, :H]) * h[:, H:] computed in row chunks that stay in cache, forward and backward.

    Saves only h; the backward writes both halves of dh straight into one [A, 2H] tensor, so the
    grouped GEMM backward gets a contiguous gradient without the concatenation autograd would do.
    On CPU this halves the time of the activation (fwd+bwd) against the unfused chunk/silu/mul.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        half = h.shape[1] // 2
        rows = max(8, 2**17 // max(half, 1))
        out = h.new_empty(h.shape[0], half)
        for s in range(0, h.shape[0], rows):
            torch.mul(F.silu(h[s:s + rows, :half]), h[s:s + rows, half:], out=out[s:s + rows])
        ctx.save_for_backward(h)
        ctx.rows = rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        half, rows = h.shape[1] // 2, ctx.rows
        grad_h = torch.empty_like(h)
        for s in range(0, h.shape[0], rows):
            gate, up, g = h[s:s + rows, :half], h[s:s + rows, half:], grad[s:s + rows]
            torch.mul(g, F.silu(gate), out=grad_h[s:s + rows, half:])
            torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=grad_h[s:s + rows, :half])
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim (2-D input)."""
    return _SwiGLU.apply(h)


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
            h = swiglu(h)
        else:
            h = F.gelu(h)
        return grouped_mm(h, self.w_down, offsets, self.backend)


def SharedExpert(width: int, hidden: int, kind: str = "swiglu") -> nn.Module:
    """The always-on expert every token also passes through (DeepSeekMoE's shared expert): a dense MLP."""
    if kind == "swiglu":
        return SwiGLU(width, hidden)
    if kind == "gelu":
        return GeluMLP(width, hidden)
    raise ValueError(f"unknown expert kind {kind!r}; available: swiglu, gelu")
