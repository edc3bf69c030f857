"""The dense and MoE byte transformers built from specs."""

from __future__ import annotations

import math

import torch

from shardyard.models import build_model, count_parameters, moe_layers
from shardyard.platform.spec import load_spec_text


def _model(kind: str = "moe", extra: str = ""):
    spec = load_spec_text(f"name: t\nmodel: {{kind: {kind}, width: 64, depth: 2, heads: 4, ffn: {{hidden: 96}}{extra}}}\n")
    torch.manual_seed(0)
    return build_model(spec.model, 64), spec


def test_causal_and_init_loss_near_8_bits() -> None:
    for kind in ("dense", "moe"):
        model, _ = _model(kind)
        model.eval()
        x = torch.randint(0, 256, (2, 48))
        logits, loss = model(x, x)
        assert logits.shape == (2, 48, 256)
        assert abs(loss.item() / math.log(2) - 8.0) < 0.2
        changed = x.clone()
        changed[:, 30] = (changed[:, 30] + 1) % 256
        logits2, _ = model(changed)
        assert torch.allclose(logits[:, :30], logits2[:, :30], atol=1e-5)
        assert not torch.allclose(logits[:, 30:], logits2[:, 30:], atol=1e-5)


def test_moe_reports_aux_losses_and_load() -> None:
    model, spec = _model("moe", ", moe: {num_experts: 4, top_k: 2}")
    x = torch.randint(0, 256, (2, 32))
    _, loss = model(x, x)
    layers = moe_layers(model)
    assert len(layers) == spec.model.depth
    for layer in layers:
        assert layer.stats["tokens_per_expert"].sum().item() == 2 * 32 * 2
        assert layer.aux_loss.requires_grad and layer.aux_loss.item() > 0
    (loss + sum(layer.aux_loss for layer in layers)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_active_parameters_count_only_top_k_experts() -> None:
    model, spec = _model("moe", ", moe: {num_experts: 8, top_k: 2}")
    total, active = count_parameters(model)
    expert = sum(p.numel() for layer in moe_layers(model) for p in layer.experts.parameters())
    assert total - active == expert * 6 // 8


def test_a_few_steps_reduce_the_loss() -> None:
    model, _ = _model("moe")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 64))
    losses = []
    for _ in range(15):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        (loss + sum(layer.aux_loss for layer in moe_layers(model))).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
