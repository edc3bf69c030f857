"""Hierarchical byte models (MEGABYTE, multiscale): causality, init loss, checkpointing, generation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shardyard.models import build_model, moe_layers
from shardyard.models.bytes import MegabyteLM, MultiscaleByteLM, generate, generate_from_checkpoint
from shardyard.models.bytes.generate import window_start
from shardyard.platform.errors import UserError
from shardyard.platform.schema import ModelSpec
from shardyard.platform.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The 2 cores here are shared: two intra-op threads contend and run small matmuls ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stage(width: int, depth: int, heads: int, patch: int, **extra: object) -> dict[str, object]:
    return {"width": width, "depth": depth, "heads": heads, "patch_size": patch, **extra}


def megabyte_spec(**extra: object) -> ModelSpec:
    return ModelSpec(kind="megabyte", stages=[stage(64, 2, 2, 16, **extra), stage(32, 2, 2, 8, **extra)])


def three_stage_spec(chunks: int = 0, moe: dict | None = None) -> ModelSpec:
    return ModelSpec(
        kind="multiscale",
        stages=[
            stage(64, 2, 2, 8, checkpoint_chunks=min(chunks, 2)),
            stage(48, 1, 2, 4, checkpoint_chunks=chunks, moe=moe),
            stage(32, 1, 2, 4, checkpoint_chunks=chunks),
        ],
    )


def spread_head(model: torch.nn.Module) -> None:
    """Untrained logits are nearly flat; widen them so greedy decoding has no near-ties."""
    torch.nn.init.normal_(model.head.weight, std=0.5)


# ------------------------------------------------------------------------------------------- spec
def test_spec_validation_messages() -> None:
    with pytest.raises(ValueError, match="exactly 2 stages"):
        ModelSpec(kind="megabyte", stages=[stage(64, 1, 2, 4)] * 3)
    with pytest.raises(ValueError, match="needs model.stages"):
        ModelSpec(kind="multiscale")
    with pytest.raises(ValueError, match="only applies to kinds megabyte"):
        ModelSpec(kind="dense", stages=[stage(64, 1, 2, 4)] * 2)
    with pytest.raises(ValueError, match="stages\\[i\\].moe"):
        ModelSpec(kind="multiscale", moe={}, stages=[stage(64, 1, 2, 4)] * 2)
    with pytest.raises(ValueError, match="must divide stage width"):
        ModelSpec(kind="multiscale", stages=[stage(64, 1, 3, 4)] * 2)
    with pytest.raises(ValueError, match="inner stages need patch_size >= 2"):
        ModelSpec(kind="multiscale", stages=[stage(64, 1, 2, 4), stage(32, 1, 2, 1)])
    assert three_stage_spec().context == 8 * 4 * 4
    with pytest.raises(UserError, match="exceeds the multiscale model's context"):
        build_model(three_stage_spec(), 200)


@pytest.mark.parametrize("job", ["megabyte-tiny", "multiscale-3stage", "megabyte-moe"])
def test_job_specs_load_and_build(job: str) -> None:
    spec = load_spec(ROOT / "jobs" / f"{job}.yaml")
    model = build_model(spec.model, spec.data.seq_len)
    assert isinstance(model, MultiscaleByteLM)
    assert spec.data.seq_len <= model.context
    assert bool(moe_layers(model)) == (job == "megabyte-moe")


# -------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("make", [megabyte_spec, three_stage_spec], ids=["megabyte", "3stage"])
def test_causal(make) -> None:
    torch.manual_seed(0)
    model = build_model(make(), 128)
    seq = torch.randint(0, 256, (2, 128))
    base = model.predict(seq, 128)
    for t in (0, 5, 7, 8, 31, 32, 63, 100, 127):  # inside patches and at every kind of boundary
        changed = seq.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        out = model.predict(changed, 128)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        if t < 127:
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 0  # later bytes do see it
    # registry contract: logits[:, t] reads idx[: t + 1] only
    idx = torch.randint(0, 256, (1, 128))
    logits, _ = model(idx)
    idx[:, 50] = (idx[:, 50] + 1) % 256
    torch.testing.assert_close(model(idx)[0][:, :50], logits[:, :50], rtol=0, atol=0)


@pytest.mark.parametrize("make", [megabyte_spec, three_stage_spec], ids=["megabyte", "3stage"])
def test_init_loss_near_8_bits(make) -> None:
    torch.manual_seed(0)
    model = build_model(make(), 128)
    window = torch.randint(0, 256, (4, 129))
    logits, loss = model(window[:, :-1], window[:, 1:])
    assert logits.shape == (4, 128, 256)
    assert abs(loss.item() / math.log(2) - 8.0) < 0.05


def test_short_sequences_padded_and_byte_zero_is_data() -> None:
    torch.manual_seed(0)
    model = build_model(three_stage_spec(), 128)
    seq = torch.randint(0, 256, (1, 128))
    full = model.predict(seq, 128)
    torch.testing.assert_close(model.predict(seq[:, :40], 41), full[:, :41])  # not a whole patch
    # all-zero bytes: every position counts in the loss, and the model can learn them
    zeros = torch.zeros(2, 65, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        logits, loss = model(zeros[:, :-1], zeros[:, 1:])
        torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 256), zeros[:, 1:].reshape(-1)))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 1.0


def _grads(model: torch.nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_stage_checkpointing_matches_plain_gradients() -> None:
    torch.manual_seed(0)
    plain = build_model(three_stage_spec(chunks=0), 128)
    chunked = build_model(three_stage_spec(chunks=3), 128)
    chunked.load_state_dict(plain.state_dict())
    assert [d.checkpoint_chunks for d in chunked.dims] == [2, 3, 3]
    idx = torch.randint(0, 256, (2, 129))
    g0, g1 = _grads(plain, idx), _grads(chunked, idx)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_moe_in_a_stage_with_checkpoint_chunks() -> None:
    moe = {"num_experts": 4, "top_k": 2}
    torch.manual_seed(0)
    plain = build_model(three_stage_spec(chunks=0, moe=moe), 128)
    chunked = build_model(three_stage_spec(chunks=4, moe=moe), 128)
    chunked.load_state_dict(plain.state_dict())
    (layer0,), (layer1,) = moe_layers(plain), moe_layers(chunked)
    for layer in (layer0, layer1):
        layer.aux_loss_weight = layer.z_loss_weight = 0.0  # compare CE gradients: routing is per token
    assert layer0.experts.w_up.shape[0] == 4
    idx = torch.randint(0, 256, (2, 129))
    g0, g1 = _grads(plain, idx), _grads(chunked, idx)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any("experts" in n for n in g0)
    # every chunk's tokens counted once, though backward recomputed them; chunk weights sum to one
    s0, s1 = layer0.take_step_stats(), layer1.take_step_stats()
    torch.testing.assert_close(s1["tokens_per_expert"], s0["tokens_per_expert"])
    assert int(s1["tokens_per_expert"].sum()) == 2 * 128 // 4 * 2  # middle-stage tokens x top_k
    assert s1["weight"].item() == pytest.approx(1.0)
    # the aux loss trains the router through the chunks
    layer1.aux_loss_weight = 0.01
    chunked.zero_grad()
    _, ce = chunked(idx[:, :-1], idx[:, 1:])
    ce.backward()
    assert layer1.take_step_stats()["aux_loss"].item() > 0
    assert layer1.router.gate.weight.grad.abs().sum() > 0
    spread_head(chunked)
    assert generate(chunked, b"moe", 40, temperature=0) == generate(chunked, b"moe", 40, temperature=0, use_cache=False)


# ------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("make", [megabyte_spec, three_stage_spec], ids=["megabyte", "3stage"])
def test_cached_generation_equals_uncached(make) -> None:
    torch.manual_seed(0)
    model = build_model(make(), 128)
    spread_head(model)
    prompts = [b"", b"d", b"def main(argv):\n    return 0\n"]  # empty, short, past a patch
    for prompt in prompts:
        fast = generate(model, prompt, 60, temperature=0, use_cache=True)
        slow = generate(model, prompt, 60, temperature=0, use_cache=False)
        assert fast == slow and len(fast) == 60
    # beyond the 128-byte context: the window slides by half a context, caches are rebuilt
    assert generate(model, b"x" * 100, 100, temperature=0) == generate(
        model, b"x" * 100, 100, temperature=0, use_cache=False
    )


def test_flat_model_generation_and_sampling() -> None:
    torch.manual_seed(0)
    flat = build_model(ModelSpec(kind="dense", width=64, depth=2, heads=2), 64)
    spread_head(flat)
    assert generate(flat, b"import os\n", 80, temperature=0) == generate(
        flat, b"import os\n", 80, temperature=0, use_cache=False
    )
    model = build_model(megabyte_spec(), 128)
    a = generate(model, b"abc", 50, temperature=0.8, top_k=5, seed=3)
    assert a == generate(model, b"abc", 50, temperature=0.8, top_k=5, seed=3, use_cache=False)
    assert a != generate(model, b"abc", 50, temperature=0.8, top_k=5, seed=4)
    assert window_start(127, 127, 8) == 0 and window_start(128, 127, 8) == 64


def test_generate_from_checkpoint_state_dict() -> None:
    torch.manual_seed(0)
    spec = megabyte_spec()
    model = build_model(spec, 128)
    spread_head(model)
    state = {f"module.{k}": v for k, v in copy.deepcopy(model.state_dict()).items()}  # DDP-style keys
    out = generate_from_checkpoint(spec, state, b"hi", 30, seq_len=128, temperature=0)
    assert out == generate(model, b"hi", 30, temperature=0)
    assert isinstance(model, MegabyteLM) and model.patch_size == 8


# ------------------------------------------------------------------------------------ long context
def test_three_stage_trains_on_64k_context() -> None:
    """One 64 KiB sequence per step, inner stages checkpointed in chunks (~7 s on one busy core)."""
    torch.manual_seed(0)
    spec = ModelSpec(
        kind="multiscale",
        stages=[
            stage(64, 1, 2, 16),
            stage(64, 1, 2, 64, ffn_hidden=128, checkpoint_chunks=4),
            stage(32, 1, 2, 64, ffn_hidden=64, checkpoint_chunks=8),
        ],
    )
    assert spec.context == 65536
    model = build_model(spec, 65536)
    text = b"".join(p.read_bytes() for p in sorted(Path(torch.__file__).parent.glob("nn/modules/*.py")))
    data = torch.tensor(list(text[:65537]), dtype=torch.long).view(1, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    losses = []
    for _ in range(6):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / math.log(2))
    assert losses[0] > 7.5 and losses[-1] < losses[0] - 0.75, losses


@pytest.mark.slow
@pytest.mark.distributed
def test_megabyte_trains_data_parallel_on_two_gloo_ranks_and_generates(tmp_path: Path) -> None:
    from shardyard.platform.spec import load_spec
    from tests.helpers import ROOT, run_cli, train_losses, train_on_gloo

    sets = {"training.steps": 16, "optim.schedule.warmup": 2, "training.eval_every": 8, "training.log_every": 1}
    sets |= {"checkpoint.every": 8, "data.max_bytes": 3000000, "checkpoint.dir": tmp_path}
    spec = load_spec(ROOT / "jobs" / "megabyte-tiny.yaml", overrides=[f"{k}={v}" for k, v in sets.items()])
    run_dir = tmp_path / spec.name
    train_on_gloo(spec, run_dir, 2)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.5
    sample = run_cli("generate", str(run_dir), "--prompt", "def ", "--bytes", "32")
    assert sample.returncode == 0 and "32 bytes" in sample.stderr, sample.stderr
