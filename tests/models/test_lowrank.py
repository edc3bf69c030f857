"""Low-rank FFN: SVD initialisation, self-guided blend, merge for inference, use in every model kind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shardyard.models import build_model
from shardyard.models.lowrank import LowRankLinear, LowRankSwiGLU, guide_weight, merge_lowrank, set_lowrank_progress
from shardyard.models.transformer import SwiGLU
from shardyard.platform.schema import FFNSpec, ModelSpec
from tests.optim.galore_helpers import one_thread


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    yield from one_thread()


def test_init_is_best_rank_r_approximation_of_dense_init() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(48, 80, 8, self_guided=0.5)  # keeps the dense init as its guide
    dense = layer.guide.detach()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
    torch.testing.assert_close(layer.u.detach() @ layer.v.detach(), best, atol=1e-6, rtol=1e-5)
    assert layer.u.shape == (80, 8) and layer.v.shape == (8, 48)
    # balanced factors: U^T U == V V^T == diag(S_r)
    torch.testing.assert_close(layer.u.T @ layer.u, layer.v @ layer.v.T, atol=1e-6, rtol=1e-5)


def test_rank_must_be_below_both_sides() -> None:
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(16, 64, 16)


def test_self_guided_schedule_and_blend() -> None:
    assert guide_weight(0.0, 0.3) == 1.0 and guide_weight(0.3, 0.3) == 0.0
    assert guide_weight(0.15, 0.3) == pytest.approx(0.5)
    assert guide_weight(0.5, 0.0) == 0.0
    torch.manual_seed(0)
    ffn = LowRankSwiGLU(32, 64, 8, self_guided=0.3)
    x = torch.randn(4, 32)
    guide_only = SwiGLU(32, 64)
    guide_only.gate_up.weight.data.copy_(ffn.gate_up.guide)
    guide_only.down.weight.data.copy_(ffn.down.guide)
    set_lowrank_progress(ffn, 0.0)
    torch.testing.assert_close(ffn(x), guide_only(x))  # alpha = 1: the dense guide alone
    set_lowrank_progress(ffn, 0.1)
    y = ffn(x)
    y.sum().backward()
    assert ffn.gate_up.guide.grad.abs().sum() > 0 and ffn.gate_up.u.grad.abs().sum() > 0
    ffn.zero_grad()
    set_lowrank_progress(ffn, 0.5)  # past the guided phase: pure low-rank
    pure = LowRankSwiGLU(32, 64, 8)
    pure.load_state_dict({k: v for k, v in ffn.state_dict().items() if "guide" not in k}, strict=False)
    pure.gate_up.alpha.zero_()
    pure.down.alpha.zero_()
    out = ffn(x)
    torch.testing.assert_close(out, pure(x))
    out.sum().backward()  # the guide stays in the graph (zero gradient): DDP sees every parameter
    assert torch.count_nonzero(ffn.gate_up.guide.grad) == 0


@pytest.mark.parametrize("self_guided", [0.0, 0.25])
def test_merge_matches_factored_forward(self_guided: float) -> None:
    torch.manual_seed(0)
    ffn = LowRankSwiGLU(32, 96, 8, self_guided=self_guided)
    set_lowrank_progress(ffn, 0.1)
    x = torch.randn(3, 5, 32)
    merged = ffn.merge()
    assert isinstance(merged, SwiGLU)
    torch.testing.assert_close(merged(x), ffn(x), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_lowrank_ffn_in_model_kinds_trains_and_merges(kind: str) -> None:
    torch.manual_seed(0)
    extra = {"moe": {"num_experts": 4, "top_k": 2, "every": 2}} if kind == "moe" else {}
    spec = ModelSpec(kind=kind, width=32, depth=2, heads=2, ffn={"kind": "lowrank", "hidden": 64, "rank": 8}, **extra)
    model = build_model(spec, 16)
    assert any(isinstance(m, LowRankSwiGLU) for m in model.modules())
    dense = build_model(ModelSpec(kind="dense", width=32, depth=2, heads=2, ffn={"hidden": 64}), 16)
    if kind == "dense":
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    x = torch.randint(0, 256, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        set_lowrank_progress(model, step / 8)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    before, _ = model(x[:, :-1])
    merge_lowrank(model)
    assert not any(isinstance(m, LowRankSwiGLU) for m in model.modules())
    after, _ = model(x[:, :-1])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_ffn_spec_validators() -> None:
    assert FFNSpec(kind="lowrank", rank=8, self_guided=0.2).self_guided == 0.2
    with pytest.raises(ValueError, match="self_guided only applies"):
        FFNSpec(kind="swiglu", self_guided=0.2)
    with pytest.raises(ValueError, match="must be below ffn.hidden"):
        FFNSpec(kind="lowrank", rank=64, hidden=64)
