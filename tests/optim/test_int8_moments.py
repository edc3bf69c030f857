"""8-bit Adam moments (`optim.galore.moments: int8`): the quantiser, state bytes, resume, and
quality: validation bits per byte within 1% of fp32 moments after 200 steps of a tiny byte model
on real text, for GaLore and Q-GaLore."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from shardyard.optim import build_optimizer, prepare_model_for_optimizer
from shardyard.optim.memory import measured_state_bytes
from shardyard.optim.quant import dequantize_moment, dynamic_map, quantize_moment
from shardyard.platform.schema import OptimSpec
from tests.optim.galore_helpers import SEQ, batches, one_thread, tiny_model, train

BPB_TOLERANCE = (
    0.01  # int8 moments' val bpb may exceed fp32 moments' by at most 1% (measured: -0.01% GaLore, +0.17% Q-GaLore)
)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    yield from one_thread()


def _spec(kind: str, moments: str) -> OptimSpec:
    return OptimSpec(
        kind=kind,
        lr=3e-3,
        weight_decay=0.1,
        schedule={"warmup": 10},
        galore={"rank": 8, "update_gap": 50, "moments": moments},
    )


def test_dynamic_map_and_relative_precision() -> None:
    for signed in (True, False):
        table = dynamic_map(signed)
        assert table.numel() == 256 and torch.all(table[1:] > table[:-1]) and table.max() == 1.0
        assert (table.min() < 0) == signed
    # values spanning five decades within one block keep ~2% relative precision (a linear INT8
    # grid would round everything below absmax/254 to zero)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-5, 0, 4096)
    q, absmax = quantize_moment(x, signed=True)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.numel() == 4096 // 256
    rel = (dequantize_moment(q, absmax, signed=True) - x).abs() / x.abs()
    assert rel.median() < 0.03 and rel.quantile(0.99) < 0.2
    # odd sizes: the last block is short
    y = torch.rand(1000)
    q, absmax = quantize_moment(y, signed=False)
    torch.testing.assert_close(dequantize_moment(q, absmax, signed=False), y, rtol=0.1, atol=1e-6)


def test_int8_moments_state_is_a_quarter_and_resumes_exactly() -> None:
    model_a, model_b = tiny_model(), tiny_model()
    fp32, int8 = (
        build_optimizer(_spec("galore_adamw", "fp32"), model_a),
        build_optimizer(_spec("galore_adamw", "int8"), model_b),
    )
    data = batches(4)
    train(model_a, fp32, data)
    train(model_b, int8, data)
    st = next(s for s in int8.state.values() if "exp_avg_q" in s)
    assert st["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in st
    small = next(s for s in int8.state.values() if "exp_avg" in s)  # norms (< 256 elements) stay fp32
    assert small["exp_avg"].numel() < 256
    ratio = measured_state_bytes(int8) / measured_state_bytes(fp32)
    assert 0.25 < ratio < 0.45, ratio  # moments 1 byte + 4/256 instead of 4 bytes; bases stay fp32

    spec = _spec("q_galore_adamw", "int8")
    full = prepare_model_for_optimizer(tiny_model(), spec)
    opt = build_optimizer(spec, full)
    train(full, opt, batches(6))
    first = prepare_model_for_optimizer(tiny_model(), spec)
    opt1 = build_optimizer(spec, first)
    train(first, opt1, batches(6)[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = prepare_model_for_optimizer(tiny_model(seed=3), spec)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(spec, resumed)
    opt2.load_state_dict(ckpt["optim"])
    train(resumed, opt2, batches(6)[3:])
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def _text() -> np.ndarray:
    """Real bytes: this repository's Python sources (deterministic order)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "shardyard")
    chunks = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    chunks.append(fh.read())
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def _run(kind: str, moments: str, steps: int, data: np.ndarray) -> float:
    split = int(len(data) * 0.9)
    train_bytes, val_bytes = data[:split], data[split:]
    model = tiny_model()
    spec = _spec(kind, moments)
    model = prepare_model_for_optimizer(model, spec)
    opt = build_optimizer(spec, model)
    gen = np.random.default_rng(0)
    for _ in range(steps):
        starts = gen.integers(0, len(train_bytes) - SEQ - 1, 16)
        x = torch.from_numpy(np.stack([train_bytes[s : s + SEQ + 1] for s in starts]).astype(np.int64))
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    gen = np.random.default_rng(1)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            starts = gen.integers(0, len(val_bytes) - SEQ - 1, 64)
            x = torch.from_numpy(np.stack([val_bytes[s : s + SEQ + 1] for s in starts]).astype(np.int64))
            losses.append(model(x[:, :-1], x[:, 1:])[1].item())
    return sum(losses) / len(losses) / math.log(2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["galore_adamw", "q_galore_adamw"])
def test_int8_moments_bpb_within_tolerance_of_fp32_over_200_steps(kind: str) -> None:
    data = _text()
    fp32 = _run(kind, "fp32", 200, data)
    int8 = _run(kind, "int8", 200, data)
    assert fp32 < 5.5, f"the model did not learn ({fp32:.3f} bpb)"  # 8 = uniform bytes
    assert int8 <= fp32 * (1 + BPB_TOLERANCE), (fp32, int8)


@pytest.mark.parametrize("signed", [True, False])
def test_moment_lookup_finds_the_nearest_map_value(signed: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20480, generator=gen) * torch.logspace(-9, 0, 20480)
    x = x if signed else x.abs()
    q, absmax = quantize_moment(x, signed)
    table = dynamic_map(signed)
    normed = (x.view(-1, 256) / absmax[:, None]).reshape(-1)
    exact_err = (table[None, :] - normed[:, None]).abs().min(dim=1).values  # brute force
    torch.testing.assert_close((table[q.long()] - normed).abs(), exact_err, rtol=0, atol=1e-7)
