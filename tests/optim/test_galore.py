"""GaLoreAdamW / QGaLoreAdamW: grouping, AdamW equivalence, state sizes, refresh counts, reference
agreement (galore-torch), 3-D expert slices, INT8 stochastic rounding, layer-wise mode, resume."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shardyard.optim import build_optimizer, build_scheduler, param_groups
from shardyard.optim.galore import GaLoreAdamW, galore_param_groups
from shardyard.optim.memory import measured_state_bytes, optimizer_memory_report
from shardyard.optim.projection import subspace_overlap
from shardyard.optim.qgalore import QGaLoreAdamW
from shardyard.platform.schema import OptimSpec
from tests.helpers import adam_update_bound
from tests.optim.galore_helpers import assert_same_weights, batches, one_thread, tiny_model, train

RANK = 8


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    yield from one_thread()


def spec(kind: str = "galore_adamw", **galore: object) -> OptimSpec:
    return OptimSpec(
        kind=kind,
        lr=1e-2,
        weight_decay=0.1,
        grad_clip=0.0 if galore.get("layerwise") else 1.0,
        galore={"rank": RANK, "update_gap": 3, **galore},
    )


# ------------------------------------------------------------------------------------ spec
def test_spec_defaults_and_validators() -> None:
    assert OptimSpec().galore is None
    q = OptimSpec(kind="q_galore_adamw")
    assert q.galore is not None and q.galore.quant is not None
    assert OptimSpec(kind="galore_adamw").galore.quant is None
    with pytest.raises(ValidationError, match="kind is 'adamw'"):
        OptimSpec(kind="adamw", galore={"rank": 4})
    # layer-wise with a clip: each parameter's gradient is clipped on its own (LayerwiseStepper)
    assert OptimSpec(kind="galore_adamw", galore={"layerwise": True}).grad_clip == 1.0
    assert OptimSpec(kind="galore_adamw", galore={"moments": "int8"}).galore.moments == "int8"
    with pytest.raises(ValidationError):
        OptimSpec(kind="galore_adamw", galore={"moments": "int4"})
    with pytest.raises(ValidationError, match="only applies to kind q_galore_adamw"):
        OptimSpec(kind="galore_adamw", galore={"quant": {}})
    with pytest.raises(ValidationError, match="max_update_gap"):
        OptimSpec(kind="q_galore_adamw", galore={"update_gap": 500, "quant": {"max_update_gap": 100}})
    with pytest.raises(ValidationError):
        OptimSpec(kind="galore_adamw", galore={"projection": "qr"})


def test_build_optimizer_dispatch_and_groups() -> None:
    model = tiny_model()
    assert type(build_optimizer(OptimSpec(), model)) is torch.optim.AdamW
    assert type(build_optimizer(spec(), model)) is GaLoreAdamW
    assert type(build_optimizer(spec("q_galore_adamw"), model)) is QGaLoreAdamW
    groups = galore_param_groups(model, ["attn", "ffn"], RANK, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["galore"] and all(".attn." in n or ".ffn." in n for n in projected)
    assert len(projected) == 8  # qkv, proj, gate_up, down x 2 blocks
    dense = {names[id(p)] for g in groups[1:] for p in g["params"]}
    assert "embed.weight" in dense and "head.weight" in dense
    assert all("norm" not in n for n in projected)
    # the schedule machinery still drives the galore groups
    opt = build_optimizer(spec(), model)
    sched = build_scheduler(spec(), opt, total_steps=10)
    assert all(g["lr"] == pytest.approx(1e-2 / 20) for g in opt.param_groups)
    del sched


def test_expert_stacks_projected_per_slice_or_left_dense() -> None:
    experts = nn.Module()
    experts.ffn = nn.Module()
    experts.ffn.w_up = nn.Parameter(torch.randn(4, 24, 40))
    per = galore_param_groups(experts, ["ffn"], RANK, 0.0, "per_expert")
    dense = galore_param_groups(experts, ["ffn"], RANK, 0.0, "dense")
    assert per[0].get("galore") and not any(g.get("galore") for g in dense)


def test_nothing_projected_equals_torch_adamw() -> None:
    a, b = tiny_model(), tiny_model()
    data = batches(5)
    ref = torch.optim.AdamW(param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = GaLoreAdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    train(a, ref, data)
    train(b, ours, data)
    # 5 steps of lr 1e-2 move a weight by up to 5e-2; where a gradient is near zero Adam's m / sqrt(v)
    # is a ratio of two tiny numbers, and the two kernels' rounding moves it by up to ~1e-5 (one
    # element of 8192 did, at 8.5e-6, from the 2026-12-06 initial weights). A wrong step is ~1e-2.
    assert_same_weights(a, b, atol=2e-5, rtol=1e-5)


def test_expert_slices_step_like_separate_matrices() -> None:
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(3, 24, 40) * 0.1)
    slices = [nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    kw = dict(lr=1e-2, rank=RANK, update_gap=2, scale=0.5)
    opt3 = GaLoreAdamW([{"params": [stack], "galore": True}], **kw)
    opt2 = GaLoreAdamW([{"params": slices, "galore": True}], **kw)
    for step in range(5):
        grad = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(step))
        stack.grad = grad.clone()
        for e in range(3):
            slices[e].grad = grad[e].clone()
        opt3.step()
        opt2.step()
    assert opt3.state[stack]["basis"].shape == (3, 24, RANK)
    for e in range(3):
        torch.testing.assert_close(stack.detach()[e], slices[e].detach(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ memory / counts
@pytest.mark.parametrize("kind", ["adamw", "galore_adamw", "q_galore_adamw"])
def test_state_size_formula_exact(kind: str) -> None:
    model = tiny_model()
    s = OptimSpec(kind=kind) if kind == "adamw" else spec(kind)
    opt = build_optimizer(s, model)
    train(model, opt, batches(1))
    report = optimizer_memory_report(s, model)
    assert measured_state_bytes(opt) == report["optimizer_state_bytes"] + report["int8_weight_bytes"]
    if kind != "adamw":
        # per projected matrix [m, n]: 2 max(m,n) r moments + min(m,n) r basis (fp32)
        qkv = model.stack.blocks[0].attn.qkv.weight  # [96, 32]
        st = opt.state[qkv]
        assert st["exp_avg"].shape == (96, RANK) and st["exp_avg_sq"].shape == (96, RANK)


def test_state_size_formula_with_expert_stacks() -> None:
    stack = nn.Module()
    stack.ffn = nn.Module()
    stack.ffn.w_up = nn.Parameter(torch.randn(4, 24, 40))
    stack.ffn.norm = nn.Parameter(torch.ones(24))
    for kind in ("galore_adamw", "q_galore_adamw"):
        s = spec(kind)
        opt = build_optimizer(s, stack)
        (stack.ffn.w_up.sum() + stack.ffn.norm.sum()).backward()
        opt.step()
        opt.zero_grad()
        report = optimizer_memory_report(s, stack)
        assert measured_state_bytes(opt) == report["optimizer_state_bytes"] + report["int8_weight_bytes"]
        expected_moments = 2 * 4 * 40 * RANK * 4
        basis = 4 * 24 * RANK * 4 if kind == "galore_adamw" else math.ceil(4 * 24 * RANK / 64) * (32 + 4)
        assert report["optimizer_state_bytes"] == expected_moments + basis + 2 * 24 * 4


def test_byte_model_state_under_35_percent_of_adamw() -> None:
    from shardyard.models import build_model
    from shardyard.platform.schema import ModelSpec

    model = build_model(ModelSpec(kind="dense", preset="tiny"), 64)
    report = optimizer_memory_report(OptimSpec(kind="galore_adamw"), model)
    assert report["state_ratio_vs_adamw"] <= 0.35
    q = optimizer_memory_report(OptimSpec(kind="q_galore_adamw"), model)
    assert q["optimizer_state_bytes"] < report["optimizer_state_bytes"]
    lw = optimizer_memory_report(OptimSpec(kind="galore_adamw", grad_clip=0, galore={"layerwise": True}), model)
    assert lw["grad_bytes"] < report["grad_bytes"] / 5


def test_svd_count_follows_update_gap() -> None:
    model = tiny_model()
    opt = build_optimizer(spec(update_gap=3), model)
    train(model, opt, batches(10))
    counts = {st["refreshes"] for st in opt.state.values() if "refreshes" in st}
    assert counts == {math.ceil(10 / 3)}  # refreshes at steps 0, 3, 6, 9
    opt = build_optimizer(spec(update_gap=20), model)
    train(model, opt, batches(10))
    assert {st["refreshes"] for st in opt.state.values() if "refreshes" in st} == {1}


def test_q_galore_gap_grows_with_similar_subspaces() -> None:
    p = nn.Parameter(torch.randn(32, 48) * 0.05)
    opt = QGaLoreAdamW(
        [{"params": [p], "galore": True}],
        lr=1e-3,
        rank=4,
        update_gap=2,
        sim_threshold=0.5,
        sim_streak=2,
        gap_growth=2.0,
        max_update_gap=8,
    )
    direction = torch.randn(32, 4) @ torch.randn(4, 48)  # fixed subspace: every refresh is similar
    refresh_steps = []
    for step in range(40):
        before = opt.state[p].get("refreshes", 0)
        p.grad = direction + 1e-3 * torch.randn(32, 48)
        opt.step()
        if opt.state[p]["refreshes"] != before:
            refresh_steps.append(step)
    gaps = [b - a for a, b in zip(refresh_steps, refresh_steps[1:])]
    assert gaps[:2] == [2, 2] and 4 in gaps and gaps[-1] == 8 and max(gaps) == 8
    # a subspace that keeps changing keeps the base gap
    q = nn.Parameter(torch.randn(32, 48) * 0.05)
    opt = QGaLoreAdamW(
        [{"params": [q], "galore": True}], lr=1e-3, rank=4, update_gap=2, sim_threshold=0.9, sim_streak=2
    )
    for step in range(20):
        q.grad = torch.randn(32, 48, generator=torch.Generator().manual_seed(step))
        opt.step()
    assert opt.state[q]["gap"] == 2 and opt.state[q]["refreshes"] == 10


# ------------------------------------------------------------------------------- Q-GaLore INT8
def _int8_run(stochastic: bool, lr: float, steps: int = 60) -> tuple[torch.Tensor, torch.Tensor, nn.Parameter]:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 96) * 0.02)
    opt = QGaLoreAdamW(
        [{"params": [p], "galore": True}],
        lr=lr,
        rank=8,
        update_gap=1000,
        scale=1.0,
        stochastic_rounding=stochastic,
        weight_group_size=128,
    )
    g = torch.randn(64, 8) @ torch.randn(8, 96)
    p.grad = g.clone()
    opt.step()  # first step quantises the init
    w0 = p.detach().clone()
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    grid = p.detach().reshape(-1, 128) / st["qscales"][:, None]
    assert torch.equal(grid, grid.round()) or (grid - grid.round()).abs().max() < 1e-3
    assert st["qweight"].dtype == torch.int8
    return w0, p.detach().clone(), p


def test_int8_weights_small_updates_survive_only_with_stochastic_rounding() -> None:
    lr = 2e-6  # per-step change ~lr (Adam-normalised) vs INT8 step ~ absmax/127 ~ 5e-4: 1/250 of a step
    w0_rtn, w_rtn, _ = _int8_run(False, lr)
    assert torch.equal(w0_rtn, w_rtn), "round-to-nearest should swallow sub-step updates"
    w0_sr, w_sr, p = _int8_run(True, lr)
    drift = w_sr - w0_sr
    assert drift.abs().sum() > 0
    # expected drift: the same run with fp32 weights (GaLoreAdamW, same projection settings)
    torch.manual_seed(0)
    ref = nn.Parameter(torch.randn(64, 96) * 0.02)
    opt = GaLoreAdamW([{"params": [ref], "galore": True}], lr=lr, rank=8, update_gap=1000, scale=1.0)
    g = torch.randn(64, 8) @ torch.randn(8, 96)
    ref.grad = g.clone()
    opt.step()
    r0 = ref.detach().clone()
    for _ in range(60):
        ref.grad = g.clone()
        opt.step()
    expected = ref.detach() - r0
    # SR noise per element is comparable to the drift itself (sqrt(60/250) signal-to-noise), but
    # over 6144 elements the regression of the drift on the fp32 drift is ~1 within a few percent
    slope = (drift * expected).sum() / (expected * expected).sum()
    assert 0.8 < slope < 1.2


# -------------------------------------------------------------------------- reference agreement
def test_agrees_with_reference_galore_torch() -> None:
    galore_torch = pytest.importorskip("galore_torch")
    a, b = tiny_model(), tiny_model()
    data = batches(8)
    kw = dict(rank=RANK, update_proj_gap=3, scale=0.25, proj_type="std")

    def groups(model: nn.Module, ref: bool) -> list[dict]:
        gs = galore_param_groups(model, ["attn", "ffn"], RANK, 0.0)
        gs[0].pop("galore")
        if ref:
            gs[0].update(kw)
        else:
            gs[0]["galore"] = True
        return gs

    # eps 1e-12: the reference adds eps outside the bias correction, torch AdamW (and we) inside;
    # with a negligible eps both formulas are the same arithmetic
    ref = galore_torch.GaLoreAdamW(
        groups(a, True), lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0, no_deprecation_warning=True
    )
    ours = GaLoreAdamW(
        groups(b, False), lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0, rank=RANK, update_gap=3, scale=0.25
    )
    la, lb = train(a, ref, data), train(b, ours, data)
    assert la == pytest.approx(lb, rel=1e-5)
    # Adam's m / sqrt(v) amplifies last-bit differences of tiny gradients: allow 1e-5 absolute
    assert_same_weights(a, b, atol=1e-5, rtol=1e-4)
    twin = dict(zip(map(id, b.parameters()), a.parameters()))
    checked = 0
    for p in b.parameters():
        st = ours.state[p]
        if "basis" in st:
            theirs = ref.state[twin[id(p)]]["projector"].ortho_matrix
            theirs = theirs if st["side"] == "left" else theirs.T  # they keep V^T for 'right'
            assert subspace_overlap(st["basis"], theirs) > 0.999
            checked += 1
    assert checked == 8


# --------------------------------------------------------------------------------- layer-wise
def test_layerwise_matches_regular_step_and_frees_grads() -> None:
    a, b = tiny_model(), tiny_model()
    data = batches(6)
    opt_a = build_optimizer(spec(), a)
    s = spec(layerwise=True)
    opt_b = build_optimizer(s, b)
    train(a, opt_a, data)
    for x in data:
        _, loss = b(x[:, :-1], x[:, 1:])
        loss.backward()
        assert all(p.grad is None for p in b.parameters())
        opt_b.step()
    assert_same_weights(a, b, atol=1e-6, rtol=1e-5)
    opt_b.remove_hooks()


# -------------------------------------------------------------------------------------- resume
def _roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "kind,galore",
    [
        ("galore_adamw", {}),
        ("galore_adamw", {"projection": "randomized"}),
        ("q_galore_adamw", {"projection": "randomized"}),
        ("galore_adamw", {"layerwise": True}),
    ],
)
def test_resume_continues_exactly(kind: str, galore: dict) -> None:
    s = spec(kind, **galore)
    data = batches(9)
    full = tiny_model()
    opt = build_optimizer(s, full)
    sched = build_scheduler(s, opt, 9)

    def run(model: nn.Module, o: torch.optim.Optimizer, sc: object, chunk: list[torch.Tensor]) -> None:
        for x in chunk:
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            sc.step()

    run(full, opt, sched, data)

    first = tiny_model()
    opt1 = build_optimizer(s, first)
    sched1 = build_scheduler(s, opt1, 9)
    run(first, opt1, sched1, data[:4])  # crosses a refresh (gap 3) and stops mid-gap
    ckpt = _roundtrip({"model": first.state_dict(), "optim": opt1.state_dict(), "sched": sched1.state_dict()})
    if kind == "q_galore_adamw":
        st = next(v for v in ckpt["optim"]["state"].values() if "qweight" in v)
        assert st["qweight"].dtype == torch.int8 and st["basis_q"].dtype == torch.uint8

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(s, resumed)
    sched2 = build_scheduler(s, opt2, 9)  # before the optimizer state: LambdaLR resets group lrs
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    run(resumed, opt2, sched2, data[4:])
    assert_same_weights(full, resumed)


def _clip_by_hand_(grad: torch.Tensor, max_norm: float) -> bool:
    """The reference per-parameter clip, written out (not the function under test): scale to
    max_norm / (norm + 1e-6) when that is below 1. Returns whether it clipped."""
    norm = float(grad.double().square().sum().sqrt())
    if max_norm / (norm + 1e-6) < 1:
        grad.mul_(max_norm / (norm + 1e-6))
        return True
    return False


def test_clip_param_grad_scales_one_gradient_to_the_threshold() -> None:
    from shardyard.optim.galore import clip_param_grad_

    grad = torch.full((3, 4), 0.5)  # norm sqrt(12) / 2 = 1.732
    assert float(clip_param_grad_(grad, 0.5)) == pytest.approx(12**0.5 / 2)  # returns the norm before
    assert float(grad.norm()) == pytest.approx(0.5, rel=1e-5)
    small = torch.full((2,), 0.1)
    clip_param_grad_(small, 0.5)  # under the threshold: unchanged
    assert torch.equal(small, torch.full((2,), 0.1))
    off = torch.full((2,), 3.0)
    clip_param_grad_(off, 0.0)  # 0 = off
    assert torch.equal(off, torch.full((2,), 3.0))


def test_layerwise_stepper_single_worker_matches_optimizer_hooks_and_clips_per_parameter() -> None:
    from shardyard.optim.layerwise import LayerwiseStepper

    data = batches(5)
    s = spec(layerwise=True)  # grad_clip 0
    a, b = tiny_model(), tiny_model()
    opt_a = build_optimizer(s, a)  # its own hooks (single worker)
    opt_b = build_optimizer(s, b)
    stepper = LayerwiseStepper(b, opt_b, bucket_bytes=8 << 10).attach()
    assert not opt_b._hooks  # the stepper took the hooks over
    for x in data:
        a(x[:, :-1], x[:, 1:])[1].backward()
        _, loss = b(x[:, :-1], x[:, 1:])
        loss.backward()
        norm = stepper.finish()
        assert torch.isfinite(norm) and norm > 0
    assert_same_weights(a, b, atol=1e-6, rtol=1e-5)
    assert stepper.peak_grad_bytes < sum(p.numel() * 4 for p in b.parameters()) / 2
    stepper.detach()
    opt_a.remove_hooks()
    # per-parameter clip: a clipped stepper equals an unclipped step on pre-clipped gradients
    clipped = OptimSpec(
        kind="galore_adamw",
        lr=1e-2,
        weight_decay=0.1,
        grad_clip=0.05,
        galore={"rank": RANK, "update_gap": 3, "layerwise": True},
    )
    c, d = tiny_model(), tiny_model()
    seen_c: dict[str, list[torch.Tensor]] = {name: [] for name, _ in c.named_parameters()}
    for name, p in c.named_parameters():  # before the optimizer's hooks: sees what they will clip and step
        p.register_post_accumulate_grad_hook(lambda p, name=name: seen_c[name].append(_clipped_copy(p.grad, 0.05)))
    opt_c = build_optimizer(clipped, c)  # hooks clip each gradient to 0.05
    opt_d = build_optimizer(spec(), d)
    seen_d: dict[str, list[torch.Tensor]] = {name: [] for name, _ in d.named_parameters()}
    # the weight gap that the last-bit differences of the two clips can explain, for the plain-AdamW
    # parameters (tests.helpers.adam_update_bound); projected ones are held to the fixed tolerance
    settings = {id(p): group for group in opt_d.param_groups for p in group["params"]}
    gap = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in d.named_parameters()}
    clipped_count = 0
    for x in data:
        c(x[:, :-1], x[:, 1:])[1].backward()
        d(x[:, :-1], x[:, 1:])[1].backward()
        for name, p in d.named_parameters():
            clipped_count += _clip_by_hand_(p.grad, 0.05)
            seen_d[name].append(p.grad.detach().clone())
            torch.testing.assert_close(seen_c[name][-1], p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))
            group = settings[id(p)]
            if not group.get("galore"):
                hyper = {k: group[k] for k in ("lr", "weight_decay", "betas", "eps")}
                gap[name] += adam_update_bound(seen_c[name], seen_d[name], gap[name], p.detach(), **hyper)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    assert clipped_count > 0  # the threshold bites, so an unclipped run would differ
    for name, p in d.named_parameters():
        got = dict(c.named_parameters())[name].detach()
        allowed = 1e-6 + 1e-5 * p.detach().abs() + gap[name]
        assert bool(((got - p.detach()).abs() <= allowed).all()), (name, float((got - p.detach()).abs().max()))
    opt_c.remove_hooks()


def _clipped_copy(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    from shardyard.optim.galore import clip_param_grad_

    copy = grad.detach().clone()
    clip_param_grad_(copy, max_norm)
    return copy


def test_job_spec_composition_rules() -> None:
    from shardyard.platform.schema import JobSpec

    base = {"name": "t", "model": {"kind": "moe", "preset": "tiny"}, "training": {"steps": 50}}
    galore = {"kind": "galore_adamw", "galore": {"layerwise": True}}
    # layer-wise under data parallelism, with expert parallelism: accepted
    JobSpec(**base, optim=galore, resources={"workers": 4}, parallel={"expert_parallel": 2})
    # DeepSpeed ZeRO flattens parameters: refused with GaLore of any kind
    for kind in ("galore_adamw", "q_galore_adamw"):
        with pytest.raises(ValidationError, match="parallel.zero.*1-D partitions"):
            JobSpec(
                **{**base, "model": {"kind": "dense", "preset": "tiny"}}, optim={"kind": kind}, parallel={"zero": 1}
            )
