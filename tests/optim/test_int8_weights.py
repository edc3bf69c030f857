"""INT8 weights without an fp32 copy: the prepared model's bytes, its layers against fp32 layers on
the dequantised weights, and Q-GaLore on INT8 layers against Q-GaLore's optimizer-state INT8 path."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from shardyard.models import build_model
from shardyard.models.moe.experts import GroupedExperts
from shardyard.optim import build_optimizer, int8_weights, prepare_model_for_optimizer
from shardyard.optim.int8_weights import Int8GroupedExperts, Int8Linear, int8_weight_of
from shardyard.optim.memory import model_tensor_bytes
from shardyard.optim.quant import dequantize_int8, quantize_int8
from shardyard.platform.schema import ModelSpec, OptimSpec
from tests.optim.galore_helpers import batches, one_thread, tiny_model, train


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    yield from one_thread()


def qspec(stochastic: bool = True, **galore: object) -> OptimSpec:
    return OptimSpec(
        kind="q_galore_adamw",
        lr=1e-2,
        weight_decay=0.1,
        galore={"rank": 8, "update_gap": 3, "quant": {"stochastic_rounding": stochastic}, **galore},
    )


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prepared_model_holds_no_fp32_copy_of_projected_weights(kind: str) -> None:
    if kind == "moe":
        torch.manual_seed(0)
        model = build_model(
            ModelSpec(kind="moe", width=32, depth=2, heads=2, ffn={"hidden": 64}, moe={"num_experts": 4, "top_k": 2}),
            16,
        )
    else:
        model = tiny_model()
    fp32_bytes = model_tensor_bytes(model)
    spec = qspec()
    opt_before = build_optimizer(spec, model)
    projected = [p for g in opt_before.param_groups if g.get("galore") for p in g["params"]]
    projected_numel = sum(p.numel() for p in projected)
    prepare_model_for_optimizer(model, spec)
    handles = [p for p in model.parameters() if int8_weight_of(p) is not None]
    assert len(handles) == len(projected)  # every projected weight became INT8
    if kind == "moe":
        assert any(isinstance(m, Int8GroupedExperts) for m in model.modules())
    gs = spec.galore.quant.weight_group_size
    scales = sum(-(-p.numel() // gs) for p in handles)
    expected = fp32_bytes - 4 * projected_numel + projected_numel + 4 * scales + 4 * len(handles)
    assert model_tensor_bytes(model) == expected
    # what remains fp32 is only the unprojected parameters (embeddings, norms, head, router)
    for p in handles:
        assert p.untyped_storage().nbytes() == 4


def test_int8_linear_blockwise_matches_linear_on_dequantised_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 200, bias=True)
    codes, scales = quantize_int8(lin.weight.detach(), 128, stochastic=False)
    ref = nn.Linear(48, 200, bias=True)
    with torch.no_grad():
        ref.weight.copy_(dequantize_int8(codes, scales, 128))
        ref.bias.copy_(lin.bias)
    model = nn.Sequential(lin)
    monkeypatch.setattr(int8_weights, "BLOCK_ELEMENTS", 48 * 16)  # 16 rows a block: several blocks
    int8_weights._convert(lin, Int8Linear, ("weight",), 128)
    assert int8_weights._row_blocks(200, 48, 128) == 16
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = model(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-6, rtol=1e-5)
    assert lin.weight.grad.is_contiguous() and lin.weight.grad.untyped_storage().nbytes() == 200 * 48 * 4


def test_int8_expert_stack_matches_grouped_experts_on_dequantised_weights() -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 48)
    ref = GroupedExperts(4, 32, 48)
    with torch.no_grad():
        for name in ("w_up", "w_down"):
            codes, scales = quantize_int8(getattr(experts, name).detach(), 128, stochastic=False)
            getattr(ref, name).copy_(dequantize_int8(codes, scales, 128))
    int8_weights._convert(experts, Int8GroupedExperts, ("w_up", "w_down"), 128)
    x = torch.randn(40, 32)
    offsets = torch.tensor([10, 10, 25, 40], dtype=torch.int32)  # expert 1 empty
    y, y_ref = experts(x, offsets), ref(x, offsets)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name in ("w_up", "w_down"):
        torch.testing.assert_close(getattr(experts, name).grad, getattr(ref, name).grad)


def _quantised_twin(model: nn.Module, spec: OptimSpec) -> None:
    """Round the projected weights of a plain model to their INT8 values (what preparing does)."""
    opt = build_optimizer(spec, model)
    gs = spec.galore.quant.weight_group_size
    with torch.no_grad():
        for g in opt.param_groups:
            if g.get("galore"):
                for p in g["params"]:
                    codes, scales = quantize_int8(p, gs, stochastic=False)
                    p.copy_(dequantize_int8(codes, scales, gs))


def _dequantised_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, m in model.named_modules():
        for name, p in m.named_parameters(recurse=False):
            key = f"{mod_name}.{name}" if mod_name else name
            owner = int8_weight_of(p)
            out[key] = owner[0].dequantized(owner[1]) if owner else p.detach().clone()
    return out


@pytest.mark.parametrize("stochastic", [False, True])
def test_training_equals_optimizer_state_int8_path(stochastic: bool) -> None:
    spec = qspec(stochastic)
    data = batches(7)
    old = tiny_model()
    _quantised_twin(old, spec)
    new = prepare_model_for_optimizer(tiny_model(), spec)
    opt_old, opt_new = build_optimizer(spec, old), build_optimizer(spec, new)
    losses_old, losses_new = train(old, opt_old, data), train(new, opt_new, data)
    w_old, w_new = _dequantised_weights(old), _dequantised_weights(new)
    if not stochastic:  # round to nearest: bit-identical
        assert losses_old == losses_new
        for k in w_old:
            assert torch.equal(w_old[k], w_new[k]), k
    else:  # the same seeded rounding draws: equal up to one INT8 step where float noise flips a draw
        assert losses_old == pytest.approx(losses_new, rel=1e-4)
        for k in w_old:
            torch.testing.assert_close(w_new[k], w_old[k], atol=2e-3, rtol=0, msg=k)
    assert not any("qweight" in st for st in opt_new.state.values())  # no INT8 master beside the layer


def test_prepared_model_resumes_exactly() -> None:
    spec = qspec(True)
    data = batches(8)
    full = prepare_model_for_optimizer(tiny_model(), spec)
    opt = build_optimizer(spec, full)
    train(full, opt, data)
    first = prepare_model_for_optimizer(tiny_model(), spec)
    opt1 = build_optimizer(spec, first)
    train(first, opt1, data[:4])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert any(k.endswith("weight_codes") and v.dtype == torch.int8 for k, v in ckpt["model"].items())
    resumed = prepare_model_for_optimizer(tiny_model(seed=5), spec)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(spec, resumed)
    opt2.load_state_dict(ckpt["optim"])
    train(resumed, opt2, data[4:])
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_other_kinds_are_left_alone() -> None:
    model = tiny_model()
    before = model_tensor_bytes(model)
    for spec in (OptimSpec(), OptimSpec(kind="galore_adamw")):
        assert prepare_model_for_optimizer(model, spec) is model
    assert model_tensor_bytes(model) == before
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_memory_report_matches_prepared_model_and_state(moments: str) -> None:
    from shardyard.optim.memory import measured_state_bytes, optimizer_memory_report

    spec = qspec(moments=moments)
    model = prepare_model_for_optimizer(tiny_model(), spec)
    opt = build_optimizer(spec, model)
    train(model, opt, batches(1))
    report = optimizer_memory_report(spec, model)
    assert measured_state_bytes(opt) == report["optimizer_state_bytes"]  # no INT8 master in the state
    handles = [p for p in model.parameters() if int8_weight_of(p) is not None]
    buffers = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith(("_codes", "_scales"))
    )
    assert model_tensor_bytes(model) == report["param_bytes"] + report["int8_weight_bytes"] + 4 * len(handles) + buffers
