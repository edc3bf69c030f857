"""The dense and MoE byte transformers built from specs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shardyard.models import build_model, count_parameters, moe_layers
from shardyard.models.moe.accounting import checkpointed, moe_scope
from shardyard.models.moe.layer import MoELayer
from shardyard.platform.spec import load_spec_text


def _model(kind: str = "moe", extra: str = ""):
    spec = load_spec_text(
        f"name: t\nmodel: {{kind: {kind}, width: 64, depth: 2, heads: 4, ffn: {{hidden: 96}}{extra}}}\n"
    )
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


def test_moe_model_gradient_matches_finite_differences() -> None:
    """Backward through routing, the grouped experts and attention equals central differences of
    the loss (float64, loop backend) on coordinates of every kind of parameter. Routing is piecewise
    constant: a coordinate whose step changes any expert choice is skipped (the difference would
    measure the jump), the others must match. The router computes its probabilities in float32,
    hence a step of 1e-3 and a 0.1% tolerance."""
    model, _ = _model("moe", ", moe: {num_experts: 4, top_k: 2, backend: loop}")
    model = model.double().eval()  # eval: no router jitter
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    routes: list[torch.Tensor] = []
    for layer in moe_layers(model):
        layer.router.register_forward_hook(lambda _m, _i, routing: routes.append(routing.expert_ids.clone()))

    def loss() -> tuple[torch.Tensor, list[torch.Tensor]]:  # CE in float64 (the model's own casts to float32)
        routes.clear()
        value = F.cross_entropy(model(x[:, :-1])[0].reshape(-1, 256), x[:, 1:].reshape(-1))
        return value, list(routes)

    model.zero_grad()
    base, base_routes = loss()
    base.backward()
    checked: dict[str, int] = {}
    for name, p in model.named_parameters():
        kind = next((k for k in ("router", "experts.w_up", "experts.w_down", "attn.qkv", "embed") if k in name), None)
        if kind is None or name.startswith("stack.blocks.0."):  # block 1 has every kind; fewer forwards
            continue
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(len(checked)))[:3].tolist():
            old, eps = flat[i].item(), 1e-3
            with torch.no_grad():
                flat[i] = old + eps
                up, up_routes = loss()
                flat[i] = old - eps
                down, down_routes = loss()
                flat[i] = old
            if any(
                not torch.equal(a, b) or not torch.equal(a, c) for a, b, c in zip(base_routes, up_routes, down_routes)
            ):
                continue  # the step moved a token to another expert
            estimate = (up.item() - down.item()) / (2 * eps)
            assert abs(estimate - grad[i].item()) <= 1e-5 + 1e-3 * abs(grad[i].item()), (
                name,
                i,
                estimate,
                grad[i].item(),
            )
            checked[kind] = checked.get(kind, 0) + 1
    assert set(checked) == {"router", "experts.w_up", "experts.w_down", "attn.qkv", "embed"}, checked


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


def test_dense_and_moe_at_one_seed_share_their_common_initial_weights() -> None:
    """A paired comparison (benchmarks/moe_quality.py) needs arms that differ only in their FFNs: the
    embedding, attention, norms and head start equal whatever the FFN is, and each seed differs; the
    initial distributions are those of GPT-2 (std 0.02, residual projections 0.02 / sqrt(2 depth))."""
    dense, _ = _model("dense")
    moe, _ = _model("moe", ", moe: {num_experts: 8, top_k: 3, expert_hidden: 16, shared_experts: 1}")
    d, m = dense.state_dict(), moe.state_dict()
    common = [k for k in d if ".ffn." not in k]
    assert common == [k for k in m if ".ffn." not in k] and len(common) == 11
    for key in common:
        assert torch.equal(d[key], m[key]), key
    torch.manual_seed(1)
    other = build_model(load_spec_text("name: t\nmodel: {kind: dense, width: 64, depth: 2, heads: 4}\n").model, 64)
    assert not torch.equal(other.state_dict()["embed.weight"], d["embed.weight"])
    residual = 0.02 / math.sqrt(2 * 2)
    for key, std in [
        ("embed.weight", 0.02),
        ("stack.blocks.1.attn.qkv.weight", 0.02),
        ("stack.blocks.1.attn.proj.weight", residual),
        ("stack.blocks.1.ffn.down.weight", residual),
    ]:
        assert abs(d[key].std().item() - std) < 0.1 * std, key
    assert abs(m["stack.blocks.1.ffn.experts.w_down"].std().item() - residual) < 0.1 * residual


def test_a_pipeline_ranks_blocks_build_with_the_whole_models_values() -> None:
    """A pipeline rank builds only its stages' blocks (the rest on the meta device): each block draws
    from its own stream, so the blocks it builds, and the embedding and head, equal the whole model's;
    and the blocks do not repeat one another."""
    spec = load_spec_text(
        "name: t\nmodel: {kind: moe, width: 32, depth: 4, heads: 2, ffn: {hidden: 64}, "
        "moe: {num_experts: 4, top_k: 2, shared_experts: 1}}\n"
    )
    torch.manual_seed(0)
    whole = build_model(spec.model, 32).state_dict()
    kept = {1, 2}
    torch.manual_seed(0)
    part = build_model(spec.model, 32, materialize=kept.__contains__)
    for i, block in enumerate(part.stack.blocks):
        assert {p.is_meta for p in block.parameters()} == {i not in kept}, i
    real = {k: v for k, v in part.state_dict().items() if not v.is_meta}
    assert len(real) > 20 and "embed.weight" in real and "head.weight" in real
    for key, value in real.items():
        assert torch.equal(value, whole[key]), key
    assert not torch.equal(whole["stack.blocks.1.ffn.experts.w_up"], whole["stack.blocks.2.ffn.experts.w_up"])
    assert not torch.equal(whole["stack.blocks.1.attn.qkv.weight"], whole["stack.blocks.2.attn.qkv.weight"])
