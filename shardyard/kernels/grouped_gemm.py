"""Grouped GEMM: y[rows of expert e] = x[rows of expert e] @ w[e], one call for all experts.

Contract: `grouped_mm(x_sorted [M, K], w [E, K, N], offsets [E] int32 cumulative row ends)` -> y [M, N].
Rows of `x_sorted` are grouped by expert; expert e owns rows offsets[e-1]:offsets[e] (offsets[-1] == M).
Backends are interchangeable and all agree with the `loop` reference, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert reference: one matmul per expert (autograd through slicing)."""
    ends = offsets.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        outs.append(x[start:end] @ w[e])
        start = end
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, w.shape[-1])


class _TorchGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        return F.grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_y, w.transpose(1, 2).contiguous(), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = F.grouped_mm(x.t().contiguous(), grad_y, offs=offsets)
        return grad_x, grad_w, None


def torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _TorchGroupedMM.apply(x.contiguous(), w.contiguous(), offsets.to(torch.int32))


BACKENDS = {"loop": loop_grouped_mm, "torch": torch_grouped_mm}


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if backend == "auto":
        backend = "torch"
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; available: {sorted(BACKENDS)}") from None
    return fn(x, w, offsets)
