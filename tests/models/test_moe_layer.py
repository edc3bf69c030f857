"""MoE layer: routers, dropless vs a per-token reference, capacity dropping, backends, losses, balancing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shardyard.kernels import backend_available
from shardyard.models import build_ffn_factory
from shardyard.models.moe import MoELayer
from shardyard.models.moe.layer import update_router_biases
from shardyard.platform.schema import ModelSpec, MoESpec

WIDTH, HIDDEN, EXPERTS = 16, 24, 6


def make_layer(router: str = "softmax_topk", top_k: int = 2, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(WIDTH, HIDDEN, EXPERTS, top_k, router=router, **kw)
    with torch.no_grad():  # larger weights than the init so outputs and gradients are far from zero
        layer.experts.w_up.normal_(0, 0.3)
        layer.experts.w_down.normal_(0, 0.3)
        layer.router.gate.weight.normal_(0, 0.5)
    return layer


def expert_mlp(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ layer.experts.w_up[e]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ layer.experts.w_down[e]


def per_token_reference(layer: MoELayer, x: torch.Tensor, keep: set[int] | None = None) -> torch.Tensor:
    """Loop over assignments one token at a time; `keep` = assignment indices that survive dropping."""
    routing = layer.router(x)
    rows = [torch.zeros(WIDTH) for _ in range(x.shape[0])]
    for a in range(routing.expert_ids.numel()):
        if keep is not None and a not in keep:
            continue
        t, e = int(routing.token_ids[a]), int(routing.expert_ids[a])
        rows[t] = rows[t] + routing.weights[a] * expert_mlp(layer, e, x[t : t + 1])[0]
    return torch.stack(rows)


def grads(layer: MoELayer, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [x.grad] + [p.grad.clone() for p in layer.parameters()]


def assert_matches_per_token_reference(layer, x):
    """Outputs and gradients of the layer equal a per-token loop over its routing decisions."""
    out, g = grads(layer, x, layer)
    ref, g_ref = grads(layer, x, lambda t: per_token_reference(layer, t))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "router,top_k",
    [
        ("softmax_topk", 1),
        ("softmax_topk", 2),
        ("softmax_topk", 3),
        ("softmax_topk", 4),
        ("switch", 1),
        ("aux_free", 2),
    ],
)
def test_dropless_matches_per_token_reference(router, top_k):
    layer = make_layer(router, top_k).eval()
    if router == "aux_free":
        layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, EXPERTS))  # bias changes the selection
    x = torch.randn(20, WIDTH)
    layer.take_step_stats()
    layer(x)
    stats = layer.take_step_stats()
    assert stats["dropped"].item() == 0.0 and stats["routed"].item() == 20 * top_k
    assert stats["tokens_per_expert"].sum().item() == 20 * top_k


def test_router_weights():
    x = torch.randn(30, WIDTH)
    topk = make_layer("softmax_topk", 3).router(x)
    torch.testing.assert_close(topk.weights.view(30, 3).sum(-1), torch.ones(30))  # renormalised
    switch_router = make_layer("switch", 1).router
    switch = switch_router(x)
    switch_logits = x @ switch_router.gate.weight.t()
    probs = F.softmax(switch_logits, dim=-1)
    torch.testing.assert_close(switch.weights, probs.max(-1).values)  # raw top-1 probability
    assert torch.equal(switch.expert_ids, switch_logits.argmax(-1))
    with pytest.raises(ValueError, match="top-1"):
        MoELayer(WIDTH, HIDDEN, EXPERTS, 2, router="switch")
    with pytest.raises(ValueError, match="unknown router"):
        MoELayer(WIDTH, HIDDEN, EXPERTS, 2, router="hash")


def test_aux_free_bias_selects_but_does_not_weight():
    layer = make_layer("aux_free", 2).eval()
    x = torch.randn(40, WIDTH)
    layer.router.expert_bias.fill_(0.0)
    layer.router.expert_bias[0] = 10.0  # every token must pick expert 0 ...
    r = layer.router(x)
    assert (r.expert_ids.view(40, 2) == 0).any(-1).all()
    probs = F.softmax(x @ layer.router.gate.weight.t(), dim=-1)
    chosen = probs.gather(-1, r.expert_ids.view(40, 2))
    torch.testing.assert_close(r.weights.view(40, 2), chosen / chosen.sum(-1, keepdim=True))  # ... unbiased weights


def test_capacity_drops_in_token_order():
    layer = make_layer("softmax_topk", 2, capacity_factor=0.5).eval()
    with torch.no_grad():  # skew the router so some experts overflow
        layer.router.gate.weight[0] += 1.0
    x = torch.randn(24, WIDTH) + 0.5
    routing = layer.router(x)
    capacity = math.ceil(0.5 * 24 * 2 / EXPERTS)
    seen = [0] * EXPERTS
    keep = set()
    for a in range(routing.expert_ids.numel()):  # first-come (token order) priority
        e = int(routing.expert_ids[a])
        if seen[e] < capacity:
            keep.add(a)
        seen[e] += 1
    out = layer(x)
    torch.testing.assert_close(out, per_token_reference(layer, x, keep).detach(), atol=1e-5, rtol=1e-4)
    stats = layer.take_step_stats()
    load = stats["tokens_per_expert"]
    assert load.max().item() <= capacity
    expected_drop = 1 - len(keep) / 48
    assert expected_drop > 0
    assert (stats["dropped"] / stats["routed"]).item() == pytest.approx(expected_drop)


def test_expert_choice():
    layer = make_layer("expert_choice", 2, capacity_factor=1.0).eval()
    x = torch.randn(30, WIDTH)
    assert_matches_per_token_reference(layer, x)
    layer.take_step_stats()
    layer(x)
    stats = layer.take_step_stats()
    capacity = math.ceil(30 * 2 / EXPERTS)
    assert stats["tokens_per_expert"].tolist() == [capacity] * EXPERTS
    routing = layer.router(x)
    untouched = 30 - torch.unique(routing.token_ids).numel()
    assert (stats["dropped"] / stats["routed"]).item() == pytest.approx(untouched / 30)


BACKENDS = ["loop", "torch"] + (["triton"] if backend_available("triton", "cpu") else [])


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice"])
def test_backends_agree_inside_the_layer(router):
    x = torch.randn(2, 9, WIDTH)
    results = {}
    for backend in BACKENDS:
        for block_rows in (None, 0):  # blocked CPU path and one grouped call per projection
            layer = make_layer(router, 2, backend=backend).eval()
            layer.experts.block_rows = block_rows
            results[f"{backend} block_rows={block_rows}"] = grads(layer, x, layer)
    ref_out, ref_g = results["loop block_rows=None"]
    for backend, (out, g) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4, msg=backend)
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=backend)


def test_aux_loss_values():
    layer = make_layer("softmax_topk", 2, aux_loss_weight=0.1, z_loss_weight=0.01)
    x = torch.randn(50, WIDTH)
    layer(x)
    logits = x @ layer.router.gate.weight.t()
    probs = F.softmax(logits, dim=-1)
    counts = torch.bincount(probs.topk(2, dim=-1).indices.reshape(-1), minlength=EXPERTS).float()
    balance = EXPERTS * torch.sum(counts / 100 * probs.mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    stats = {k: v.float() for k, v in layer.take_step_stats().items()}
    torch.testing.assert_close(stats["balance_loss"], balance)
    torch.testing.assert_close(stats["z_loss"], z)
    torch.testing.assert_close(stats["aux_loss"], 0.1 * balance + 0.01 * z)
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # uniform router: balance loss is exactly 1, z-loss log(E)^2
    layer(x)
    stats = layer.take_step_stats()
    assert stats["balance_loss"].item() == pytest.approx(1.0)
    assert stats["z_loss"].item() == pytest.approx(math.log(EXPERTS) ** 2)


def _skewed_tokens(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 2.0  # feature 0 is constant; the gate's column 0 favours low expert ids
    return x


def _skew_router(layer: MoELayer) -> None:
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = torch.linspace(1.0, -1.0, EXPERTS)


def test_bias_balancing_moves_load_toward_balance_and_is_checkpointed():
    layer = make_layer("aux_free", 2, bias_update_rate=0.01)
    _skew_router(layer)
    x = _skewed_tokens(256, 0)

    def imbalance() -> float:
        layer.eval()
        with torch.no_grad():
            layer(x)
        load = layer.take_step_stats()["tokens_per_expert"].float()
        layer.train()
        return (load.max() / load.mean()).item()

    before = imbalance()
    with torch.no_grad():
        for _ in range(60):  # one optimizer step each: the bias moves once per step
            layer(x)
            update_router_biases([layer])
            layer.take_step_stats()
    after = imbalance()
    assert before > 1.5 and after < 1.25, (before, after)
    bias = layer.router.expert_bias.clone()
    assert bias[0] < 0 < bias[-1]  # the overloaded expert is pushed down
    fresh = make_layer("aux_free", 2)
    assert "router.expert_bias" in layer.state_dict()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.router.expert_bias, bias)
    # plain routers keep no bias in their checkpoints
    assert "router.expert_bias" not in make_layer("softmax_topk").state_dict()


def _dp_worker(topology, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    layer = make_layer("aux_free", 2, bias_update_rate=0.01)
    _skew_router(layer)
    with torch.no_grad():
        for step in range(5):  # every rank sees different tokens
            layer(_skewed_tokens(64, seed=100 * topology.rank + step))
            update_router_biases([layer], dist.group.WORLD)  # collective: the load summed over both ranks
            layer.take_step_stats()
    bias = layer.router.expert_bias.clone()
    gathered = [torch.empty_like(bias) for _ in range(topology.world_size)]
    dist.all_gather(gathered, bias)
    if topology.rank == 0:
        with open(f"{out_dir}/bias.json", "w") as f:
            json.dump([g.tolist() for g in gathered], f)


@pytest.mark.distributed
def test_bias_update_is_identical_across_data_parallel_ranks(tmp_path):
    import json

    from shardyard.comm.launch import spawn

    spawn(_dp_worker, 2, 2, str(tmp_path))
    results = json.loads((tmp_path / "bias.json").read_text())
    assert results[0] == results[1]
    # and equal to one process updating from the summed load of both ranks' tokens
    layer = make_layer("aux_free", 2, bias_update_rate=0.01)
    _skew_router(layer)
    with torch.no_grad():
        for step in range(5):
            layer.router.update_bias(
                sum(
                    torch.bincount(layer.router(_skewed_tokens(64, 100 * r + step)).expert_ids, minlength=EXPERTS)
                    for r in range(2)
                )
            )
    torch.testing.assert_close(torch.tensor(results[0]), layer.router.expert_bias)


def test_shared_expert_adds_a_dense_path():
    layer = make_layer("softmax_topk", 2, shared_expert=True).eval()
    x = torch.randn(10, WIDTH)
    expected = per_token_reference(layer, x) + layer.shared_expert(x)
    torch.testing.assert_close(layer(x), expected.detach(), atol=1e-5, rtol=1e-4)


def test_step_stats_for_the_trainer():
    layer = make_layer()
    out = layer(torch.randn(3, 5, WIDTH))
    assert out.shape == (3, 5, WIDTH)
    stats = layer.take_step_stats()
    assert set(stats) == {
        "tokens_per_expert",
        "aux_loss",
        "balance_loss",
        "z_loss",
        "dropped",
        "routed",
        "entropy",
        "weight",
    }
    assert all(stats[key].dim() == 0 for key in stats if key != "tokens_per_expert")
    assert stats["tokens_per_expert"].shape == (EXPERTS,) and stats["tokens_per_expert"].sum() == 15 * layer.top_k


def test_spec_fields_reach_the_layer():
    spec = ModelSpec(
        kind="moe",
        width=32,
        ffn={"hidden": 64},
        moe=MoESpec(
            num_experts=4, top_k=2, router="aux_free", shared_expert=True, bias_update_rate=0.05, backend="loop"
        ),
    )
    layer = build_ffn_factory(spec, spec.width, spec.ffn_hidden, spec.moe)(0)
    assert isinstance(layer, MoELayer)
    assert layer.router.kind == "aux_free" and layer.router.bias_update_rate == 0.05
    assert layer.shared_expert is not None and layer.backend == "loop"
    ec_spec = ModelSpec(kind="moe", moe=MoESpec(router="expert_choice", capacity_factor=2.0))
    ec = build_ffn_factory(ec_spec, ec_spec.width, ec_spec.ffn_hidden, ec_spec.moe)(0)
    assert ec.router.capacity(64) == math.ceil(2.0 * 64 * 2 / 8)


def test_bias_moves_once_per_optimizer_step_despite_micro_batches_and_recompute():
    from shardyard.models.moe.accounting import checkpointed, moe_scope
    from shardyard.models.moe.layer import attach_router_bias_updates

    layer = make_layer("aux_free", 2, bias_update_rate=0.01)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    attach_router_bias_updates([layer], optimizer)
    x = torch.randn(32, WIDTH)
    for half in x.chunk(2):  # two micro-batches, each recomputed in backward
        with moe_scope(weight=0.5):
            checkpointed(layer, half.requires_grad_()).sum().backward()
    assert layer.router.expert_bias.abs().max().item() == 0.0  # nothing moves before the step
    load = layer.tokens_per_expert.clone()
    assert load.sum().item() == 32 * 2  # each token counted once
    optimizer.step()
    expected = 0.01 * torch.sign(load.mean() - load).float()
    torch.testing.assert_close(layer.router.expert_bias, expected)


def test_bf16_layer_runs_close_to_fp32():
    layer = make_layer("softmax_topk", 2)
    x = torch.randn(24, WIDTH)
    ref = layer(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16).requires_grad_())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.detach(), atol=0.1, rtol=0.05)
    assert layer.experts.w_up.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("block_rows", [3, 7, 1000])
def test_blocked_expert_mlp_matches_grouped(kind, block_rows):
    from shardyard.models.moe.experts import GroupedExperts, expert_blocks

    torch.manual_seed(0)
    ref = GroupedExperts(5, WIDTH, HIDDEN, kind, backend="loop")
    blocked = GroupedExperts(5, WIDTH, HIDDEN, kind, backend="torch", block_rows=block_rows)
    blocked.load_state_dict(ref.state_dict())
    offsets = torch.tensor([4, 4, 13, 14, 20], dtype=torch.int32)  # uneven, one empty, a 1-row expert
    blocks = expert_blocks(offsets, block_rows)
    assert blocks[0][2] == 0 and blocks[-1][3] == 20
    assert all(a[3] == b[2] for a, b in zip(blocks, blocks[1:]))  # contiguous cover of the rows
    x = torch.randn(20, WIDTH)
    outs = []
    for module in (ref, blocked):
        xi = x.clone().requires_grad_()
        y = module(xi, offsets)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y.detach(), xi.grad, module.w_up.grad, module.w_down.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
