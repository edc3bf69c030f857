"""The dense and MoE byte transformers built from specs."""

from __future__ import annotations

import math

import torch

from shardyard.models import build_model, count_parameters, moe_layers
from shardyard.models.moe.accounting import checkpointed, moe_scope
from shardyard.models.moe.layer import MoELayer
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


def test_moe_layers_account_tokens_and_aux_loss_over_the_step() -> None:
    model, spec = _model("moe", ", moe: {num_experts: 4, top_k: 2}")
    x = torch.randint(0, 256, (2, 32))
    for _ in range(2):  # two micro-batches of half the step each
        with moe_scope(weight=0.5):
            _, loss = model(x, x)
        loss.backward()
    layers = moe_layers(model)
    assert len(layers) == spec.model.depth
    for layer in layers:
        stats = layer.take_step_stats()
        assert stats["tokens_per_expert"].sum().item() == 2 * 2 * 32 * 2  # both micro-batches x top_k
        assert stats["weight"].item() == 1.0 and stats["aux_loss"].item() > 0
        assert layer.tokens_per_expert.sum().item() == 0  # reset
    assert all(p.grad is not None for p in model.parameters())


def test_aux_loss_gradient_equals_adding_it_to_the_loss() -> None:
    """The aux loss reaches the router through the layer's output exactly as if it had been added
    to the loss: compare with the router's own losses added explicitly (layer in eval mode skips it)."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=4, top_k=2, aux_loss_weight=0.5, z_loss_weight=0.1)
    x = torch.randn(24, 16)
    layer(x).square().sum().backward()
    implicit = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    layer.eval()  # no attached aux loss
    routing = layer.router(x)
    explicit_aux = 0.5 * routing.balance_loss + 0.1 * routing.z_loss
    (layer(x).square().sum() + explicit_aux).backward()
    torch.testing.assert_close(implicit, layer.router.gate.weight.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(implicit, torch.zeros_like(implicit))


def test_recomputed_forward_is_not_counted_twice() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=4, top_k=2)
    x = torch.randn(24, 16, requires_grad=True)
    checkpointed(layer, x).sum().backward()  # forward, then recompute inside backward
    stats = layer.take_step_stats()
    assert stats["tokens_per_expert"].sum().item() == 24 * 2 and stats["weight"].item() == 1.0


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
        loss.backward()  # the MoE layers' aux losses ride along in backward
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
