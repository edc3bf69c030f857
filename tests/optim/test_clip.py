"""The one gradient-norm clip on one process against torch's clip_grad_norm_ (the distributed cases,
DTensor shards and expert shards, are checked against a single worker in tests/runtime/test_gradients.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shardyard.optim.clip import clip_grad_norm_


def _model_with_grads(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 300), nn.LayerNorm(300), nn.Linear(300, 7)).to(dtype)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn_like(p) * (3.0**i)  # norms over four orders of magnitude
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])
def test_clip_equals_torch_clip_grad_norm(dtype: torch.dtype, max_norm: float) -> None:
    ours, ref = _model_with_grads(dtype), _model_with_grads(dtype)
    unclipped = copy.deepcopy([p.grad for p in ours.parameters()])
    norm = clip_grad_norm_(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm > 0 else float("inf"))
    assert norm.dtype == torch.float32 and norm.device.type == "cpu"
    exact = torch.stack([g.double().norm() for g in unclipped]).norm()
    assert float(norm) == pytest.approx(float(exact), rel=1e-6)  # float32 norms, float64 sum: exact to rounding
    assert float(norm) == pytest.approx(float(expected), rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    for p, q, g in zip(ours.parameters(), ref.parameters(), unclipped):
        if max_norm == 0.0 or max_norm > float(exact):
            assert torch.equal(p.grad, g)  # off, or below the limit: untouched
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
