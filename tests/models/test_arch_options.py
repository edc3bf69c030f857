"""Architecture options (model.kv_heads, head_dim, rope, qk_norm, qkv_bias, tie_embeddings; moe.score,
renormalize, routed_scale, expert_hidden, shared experts, first_dense_layers): each against a hand
computation, and the spec's refusals naming the field."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from shardyard.models import build_model, moe_layers
from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.router import ExpertChoiceRouter, TopKRouter
from shardyard.models.transformer import (
    AttnOptions,
    CausalSelfAttention,
    RopeScaling,
    apply_rotary,
    rotary_tables,
)
from shardyard.platform.schema import ModelSpec

WIDTH, EXPERTS = 16, 6


def _router(**kw) -> TopKRouter:
    torch.manual_seed(0)
    r = TopKRouter(WIDTH, EXPERTS, kw.pop("top_k", 2), **kw)
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.5)
    return r


def _hand_weights(router: TopKRouter, x: torch.Tensor, score: str, renorm: bool, scale: float, bias=None):
    """Per token, by loops: scores, top-k (on score + bias), weights from the unbiased scores."""
    logits = x @ router.gate.weight.t()
    out = []
    for t in range(x.shape[0]):
        row = logits[t].tolist()
        s = [1 / (1 + math.exp(-v)) for v in row] if score == "sigmoid" else [math.exp(v) for v in row]
        if score == "softmax":
            total = sum(s)
            s = [v / total for v in s]
        select = [v + (float(bias[e]) if bias is not None else 0.0) for e, v in enumerate(s)]
        chosen = sorted(range(EXPERTS), key=lambda e: -select[e])[: router.top_k]
        w = [s[e] for e in chosen]
        if renorm:
            w = [v / sum(w) for v in w]
        out.append({e: v * scale for e, v in zip(chosen, w)})
    return out


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["softmax_topk", "aux_free"])
def test_router_weights_match_a_hand_computation(score: str, renorm: bool, scale: float, kind: str) -> None:
    router = _router(kind=kind, score=score, renormalize=renorm, routed_scale=scale)
    if kind == "aux_free":
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
    x = torch.randn(7, WIDTH, generator=torch.Generator().manual_seed(1))
    routing = router(x)
    got = [{} for _ in range(7)]
    for t, e, w in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights.tolist()):
        got[t][e] = w
    bias = router.expert_bias if kind == "aux_free" else None
    expected = _hand_weights(router, x, score, renorm, scale, bias)
    for g, h in zip(got, expected):
        assert g.keys() == h.keys()
        for e in g:
            assert g[e] == pytest.approx(h[e], rel=1e-5, abs=1e-7)


def test_expert_choice_weights_are_scaled_probabilities_of_each_experts_top_tokens() -> None:
    """Expert e takes the C tokens with the highest softmax probability for e; the combine weight is
    routed_scale x that probability (by loops over experts and tokens)."""
    torch.manual_seed(0)
    router = ExpertChoiceRouter(WIDTH, EXPERTS, 2, capacity_factor=1.5, routed_scale=8.0)
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.5)
    tokens = 9
    x = torch.randn(tokens, WIDTH, generator=torch.Generator().manual_seed(1))
    routing = router(x)
    logits = (x @ router.gate.weight.t()).tolist()
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    capacity = math.ceil(1.5 * tokens * 2 / EXPERTS)  # 5
    expected = {}
    for e in range(EXPERTS):
        for t in sorted(range(tokens), key=lambda t: -probs[t][e])[:capacity]:
            expected[(t, e)] = 8.0 * probs[t][e]
    got = {
        (t, e): w for t, e, w in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights.tolist())
    }
    assert got.keys() == expected.keys() and len(got) == capacity * EXPERTS
    for key, w in got.items():
        assert w == pytest.approx(expected[key], rel=1e-5)


def test_router_defaults_are_unchanged() -> None:
    """softmax_topk renormalises, switch does not; routed_scale 1; sigmoid weights are not a distribution."""
    assert _router(kind="softmax_topk").renormalize and not _router(kind="switch", top_k=1).renormalize
    x = torch.randn(5, WIDTH)
    w = _router(kind="softmax_topk")(x).weights.view(5, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    w = _router(kind="softmax_topk", score="sigmoid", renormalize=False)(x).weights
    assert (w > 0).all() and (w < 1).all()


def test_switch_routed_scale_restores_the_output_size() -> None:
    """A switch layer's output is ~1/E of its expert's at init; routed_scale E undoes that."""
    torch.manual_seed(0)
    plain = MoELayer(WIDTH, 24, EXPERTS, 1, router="switch", backend="loop")
    scaled = MoELayer(WIDTH, 24, EXPERTS, 1, router="switch", backend="loop", routed_scale=float(EXPERTS))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(32, WIDTH)
    torch.testing.assert_close(scaled(x), EXPERTS * plain(x), rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_equals_an_explicit_repeat_kv_reference() -> None:
    torch.manual_seed(0)
    heads, kv, hd, width, t = 6, 2, 8, 20, 11
    attn = CausalSelfAttention(width, heads, AttnOptions(kv_heads=kv, head_dim=hd, qkv_bias=True))
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(2, t, width)
    cos, sin = rotary_tables(t, hd, 10000.0)
    got = attn(x, (cos, sin))
    # reference: separate q/k/v, repeat each kv head for its group of query heads, plain causal softmax
    w, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ w[: heads * hd].t() + b[: heads * hd]).view(2, t, heads, hd).transpose(1, 2)
    k = (x @ w[heads * hd : (heads + kv) * hd].t() + b[heads * hd : (heads + kv) * hd]).view(2, t, kv, hd)
    v = (x @ w[(heads + kv) * hd :].t() + b[(heads + kv) * hd :]).view(2, t, kv, hd)
    k, v = k.transpose(1, 2).repeat_interleave(heads // kv, dim=1), v.transpose(1, 2).repeat_interleave(heads // kv, 1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, t, heads * hd)
    torch.testing.assert_close(got, y @ attn.proj.weight.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_qk_norm_normalises_queries_and_keys_before_rotary(mode: str) -> None:
    torch.manual_seed(0)
    heads, width, t = 4, 16, 5
    attn = CausalSelfAttention(width, heads, AttnOptions(qk_norm=mode, kv_heads=2 if mode == "head" else None))
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, t, width)
    q, k, _ = attn.project(x)
    raw = x @ attn.qkv.weight.t()
    kvh = attn.kv_heads
    rq, rk = raw[..., :width], raw[..., width : width + kvh * 4]
    if mode == "full":
        rq, rk = attn.q_norm(rq), attn.k_norm(rk)
    rq, rk = rq.view(1, t, heads, 4), rk.view(1, t, kvh, 4)
    if mode == "head":
        rq = rq * torch.rsqrt(rq.square().mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        rk = rk * torch.rsqrt(rk.square().mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight
    torch.testing.assert_close(q, rq.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, rk.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_llama3_rope_scaling_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scale == 1.0
    base = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    ours = RopeScaling(8.0, 1.0, 4.0, 64).apply(base)
    torch.testing.assert_close(ours, inv_freq.float(), rtol=0, atol=0)


def test_default_spec_builds_the_same_weights_as_before() -> None:
    """Defaults keep today's model: same parameter names and shapes, same values for one seed."""
    spec = ModelSpec(kind="moe", width=32, depth=2, heads=4, moe={"num_experts": 4})
    torch.manual_seed(0)
    model = build_model(spec, 16)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names["stack.blocks.0.attn.qkv.weight"] == (96, 32)
    assert "stack.blocks.0.attn.qkv.bias" not in names and "stack.blocks.0.ffn.shared_gate.weight" not in names
    assert model.head.weight is not model.embed.weight


def test_option_heavy_model_builds_trains_and_ties() -> None:
    spec = ModelSpec(
        kind="moe",
        width=32,
        depth=3,
        heads=4,
        kv_heads=2,
        head_dim=12,
        qk_norm="head",
        qkv_bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
        rope_theta=5e5,
        rope_scaling={"type": "llama3", "factor": 4.0, "original_context": 8},
        ffn={"hidden": 48},
        moe={
            "num_experts": 4,
            "top_k": 2,
            "expert_hidden": 16,
            "shared_experts": 2,
            "shared_hidden": 8,
            "shared_gate": True,
            "first_dense_layers": 1,
            "score": "sigmoid",
            "routed_scale": 2.0,
        },
    )
    torch.manual_seed(0)
    model = build_model(spec, 16)
    assert model.head.weight is model.embed.weight
    layers = moe_layers(model)
    assert len(layers) == 2 and not isinstance(model.stack.blocks[0].ffn, MoELayer)
    assert layers[0].experts.w_down.shape == (4, 16, 32)
    assert layers[0].shared_expert.down.weight.shape == (32, 16)  # 2 shared experts of 8
    assert model.stack.blocks[0].ffn.down.weight.shape == (32, 48)
    attn = model.stack.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 + 2) * 12, 32) and attn.proj.weight.shape == (32, 48)
    assert model.stack.norm.eps == 1e-5
    x = torch.randint(0, 256, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(loss)


def test_shared_gate_scales_the_shared_expert_by_a_sigmoid() -> None:
    torch.manual_seed(0)
    layer = MoELayer(WIDTH, 24, EXPERTS, 2, backend="loop", shared_expert=True, shared_gate=True, shared_hidden=12)
    ungated = MoELayer(WIDTH, 24, EXPERTS, 2, backend="loop", shared_expert=True, shared_hidden=12)
    ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared_gate" not in k})
    x = torch.randn(9, WIDTH)
    shared = layer.shared_expert(x)
    expected = ungated(x) - shared + torch.sigmoid(x @ layer.shared_gate.weight.t()) * shared
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"heads": 4, "kv_heads": 3}, "model.kv_heads"),
        ({"head_dim": 7}, "model.head_dim"),
        ({"width": 30, "heads": 4}, "model.head_dim"),
        ({"qk_norm": "full", "head_dim": 12}, "qk_norm"),
        ({"rope_scaling": {"type": "llama3", "low_freq_factor": 4, "high_freq_factor": 2}}, "high_freq_factor"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
        ({"moe": {"shared_gate": True}}, "moe.shared_gate"),
        ({"moe": {"shared_hidden": 8}}, "moe.shared_hidden"),
        ({"moe": {"shared_expert": True, "shared_experts": 2}}, "moe.shared_experts"),
        ({"moe": {"router": "expert_choice", "score": "sigmoid"}}, "moe.score"),
        ({"moe": {"first_dense_layers": 4}}, "moe.first_dense_layers"),
        ({"moe": {"routed_scale": 0}}, "routed_scale"),
        ({"kind": "dense", "upcycle_from": "/x"}, "model.upcycle_from"),
        ({"upcycle_from": "/x", "init_from": "/y"}, "model.init_from"),
    ],
)
def test_spec_refusals_name_the_field(model: dict, field: str) -> None:
    data = {"kind": "moe", "width": 32, "depth": 4, "heads": 4, **model}
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        ModelSpec(**data)


def test_byte_models_refuse_flat_options() -> None:
    stages = [
        {"width": 32, "depth": 1, "heads": 2, "patch_size": 4},
        {"width": 16, "depth": 1, "heads": 2, "patch_size": 4},
    ]
    with pytest.raises(ValidationError, match=r"model\.kv_heads applies to flat models"):
        ModelSpec(kind="megabyte", stages=stages, kv_heads=1)


def test_gqa_generation_with_cache_equals_recomputation() -> None:
    from shardyard.models.bytes import generate

    spec = ModelSpec(kind="dense", width=32, depth=2, heads=4, kv_heads=1, qk_norm="head", qkv_bias=True)
    torch.manual_seed(0)
    model = build_model(spec, 32)
    a = generate(model, b"abc", 20, temperature=0, use_cache=True)
    b = generate(model, b"abc", 20, temperature=0, use_cache=False)
    assert a == b
