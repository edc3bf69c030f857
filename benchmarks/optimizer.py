"""The optimizer step by implementation (`optim.implementation`: fused | foreach | for-loop) for a job's
model, one thread: the same gradients, every implementation's step timed in turn within each round.

Reported: the median step time over rounds, its spread, the speed-up against the for-loop (torch's CPU
default, what every job stepped with before `optim.implementation`), and the largest difference of the
parameters after the timed steps from the for-loop's (the implementations differ in rounding only).

    python benchmarks/optimizer.py [--specs jobs/moe-tiny.yaml,jobs/compare-dense.yaml] [--rounds 20]
    python benchmarks/optimizer.py --smoke      # a toy, 3 rounds (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.models import build_model  # noqa: E402
from shardyard.optim import build_optimizer  # noqa: E402
from shardyard.platform.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("for-loop", "foreach", "fused")
SMOKE = ["model.width=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64", "model.moe.num_experts=8"]


def bench(spec_path: str, overrides: list[str], rounds: int) -> str:
    spec = load_spec(str(ROOT / spec_path), ["tracking.mode=disabled", *overrides])
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, spec.data.seq_len)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    models = {impl: copy.deepcopy(model) for impl in IMPLEMENTATIONS}
    for m in models.values():
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    optimizers = {
        impl: build_optimizer(spec.optim.model_copy(update={"implementation": impl}), models[impl])
        for impl in IMPLEMENTATIONS
    }
    times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
    for r in range(rounds + 2):  # the first two rounds allocate the moments: not timed
        for impl, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            if r >= 2:
                times[impl].append(time.perf_counter() - start)
    ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    spread = {impl: f"{1e3 * min(t):.1f}..{1e3 * max(t):.1f}" for impl, t in times.items()}
    ref = dict(models["for-loop"].named_parameters())
    diff = max(
        float((p - ref[name]).abs().max().detach())
        for impl in IMPLEMENTATIONS
        for name, p in models[impl].named_parameters()
    )
    params = sum(p.numel() for p in model.parameters())
    cells = " | ".join(f"{ms[impl]:.1f} ({spread[impl]}) | {ms['for-loop'] / ms[impl]:.2f}" for impl in IMPLEMENTATIONS)
    return f"| {spec_path} | {params / 1e6:.1f}M | {len(ref)} | {cells} | {diff:.1e} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="jobs/moe-tiny.yaml,jobs/compare-dense.yaml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs, overrides = (["jobs/moe-tiny.yaml"], SMOKE) if args.smoke else (args.specs.split(","), [])
    rounds = 3 if args.smoke else args.rounds
    print(f"torch {torch.__version__}, 1 thread, {rounds} rounds, load {os.getloadavg()}")
    header = " | ".join(f"{impl} ms (spread) | x for-loop" for impl in IMPLEMENTATIONS)
    print(f"\n| spec | params | tensors | {header} | max param diff from for-loop |")
    print("|---|---:|---:|" + "---:|" * (2 * len(IMPLEMENTATIONS)) + "---:|")
    for spec_path in specs:
        print(bench(spec_path, overrides, rounds), flush=True)
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
