"""Token permutation for the MoE layer: gather tokens into expert order, scatter weighted results back.

`gather_rows(tokens [T, d], token_of [A])` -> [A, d]: row a is the token of assignment a (a gather).
`weighted_sum(y [A, d], weight [A], token_of [A], T)` -> [T, d]: out[t] = sum over t's assignments of w * y.

Both are index operations over whole tensors (no Python loop over tokens); their backward passes are
the mirrored scatter / gather, written out by hand so no [A, d] temporary is kept that autograd
would otherwise save (the weighted product), and so the weight gradient is one fused row-dot.
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_of)
        ctx.num_tokens = tokens.shape[0]
        return tokens.index_select(0, token_of)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (token_of,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.num_tokens, grad.shape[1])
        return out.index_add_(0, token_of, grad), None


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor, token_of: torch.Tensor, num_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(y, weight, token_of)
        out = y.new_zeros(num_tokens, y.shape[1])
        return out.index_add_(0, token_of, y * weight.unsqueeze(1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        y, weight, token_of = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, token_of)  # [A, d]: the output grad of each assignment
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.einsum("ad,ad->a", grad_rows, y)
        grad_y = grad_rows.mul_(weight.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None


def gather_rows(tokens: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(tokens, token_of)


def weighted_sum(y: torch.Tensor, weight: torch.Tensor, token_of: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return _WeightedSum.apply(y, weight, token_of, num_tokens)
