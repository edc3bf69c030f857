"""training.compile on CPU: the Trainer's step (forward, backward, clip, the job's optimizer) eager vs
compiled, for moe-tiny, a 46M-parameter MoE (width 384, depth 6, top-2 of 8 experts of 768; ~14M
active) and a dense model (jobs/compare-dense.yaml), one worker, one thread; beside them the reference
the issue sets: a plain loop over the same model, eager and `torch.compile(model)` (the whole model as
one graph), with the same optimizer and torch's clip_grad_norm_.

All four arms of a model live in this process; after the compiled ones' first steps (their compile
time, reported) they take turns, `--steps` steps each per round, so load drifts hit all alike.
Reported: the median step time (wall) over rounds and its spread, each pair's speed-up, the Trainer's
compiled step against the whole-model compiled loop's, and whether the Trainer's compiled and eager
losses agree (same data, same initial weights).

    python benchmarks/compile.py [--rounds 5] [--steps 5] [--models moe-tiny,moe-46m,dense]
    python benchmarks/compile.py --smoke     # a 2-block toy, 1 round (tens of seconds: it compiles)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.optim import build_optimizer  # noqa: E402
from shardyard.platform.spec import load_spec  # noqa: E402
from shardyard.runtime.worker import LocalReporter, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOE_46M = [
    "model.preset=null",
    "model.width=384",
    "model.depth=6",
    "model.heads=6",
    "model.ffn.hidden=768",
    "model.moe.num_experts=8",  # top-2 of 8 experts of 768: the expert layout spelled out (moe-tiny's is fine-grained)
    "model.moe.top_k=2",
    "model.moe.expert_hidden=768",
    "model.moe.shared_experts=0",
    "model.moe.routed_scale=1.0",
]
MODELS: dict[str, tuple[str, list[str]]] = {
    "moe-tiny": ("jobs/moe-tiny.yaml", []),
    "moe-46m": ("jobs/moe-tiny.yaml", MOE_46M),
    "dense": ("jobs/compare-dense.yaml", []),
}
SMOKE = (
    "jobs/moe-tiny.yaml",
    ["model.preset=null", "model.width=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64"],
)
COMMON = ["resources.workers=1", "training.eval_bytes=1024", "data.max_bytes=2000000", "tracking.mode=disabled"]


def trainer(spec_path: str, overrides: list[str], compiled: bool, root: Path, name: str) -> Trainer:
    sets = [*COMMON, *overrides, f"training.compile={str(compiled).lower()}", f"name={name}", f"checkpoint.dir={root}"]
    spec = load_spec(str(ROOT / spec_path), sets)
    return Trainer(spec, root / name, LocalReporter(root / name, 1))


def timed_steps(step: Callable[[], float], steps: int) -> tuple[list[float], list[float]]:
    walls, losses = [], []
    for _ in range(steps):
        w = time.perf_counter()
        losses.append(step())
        walls.append(time.perf_counter() - w)
    return walls, losses


def plain_loop(t: Trainer, compiled: bool) -> Callable[[], float]:
    """The reference: a copy of the Trainer's initial model, `torch.compile(model)` or eager, the same
    optimizer kind (build_optimizer), torch's clip_grad_norm_, a fixed batch of random bytes."""
    spec = t.spec
    model = copy.deepcopy(t.model)
    optimizer = build_optimizer(spec.optim, model)
    run = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(0)
    shape = (spec.training.batch_size, spec.data.seq_len)
    inputs, targets = torch.randint(0, 256, shape, generator=gen), torch.randint(0, 256, shape, generator=gen)

    def step() -> float:
        _, loss = run(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def trainer_step(t: Trainer) -> Callable[[], float]:
    return lambda: float(t.train_step()["ce"])


def bench(label: str, spec_path: str, overrides: list[str], rounds: int, steps: int, root: Path) -> str:
    eager = trainer(spec_path, overrides, False, root, f"{label}-eager")
    compiled = trainer(spec_path, overrides, True, root, f"{label}-compiled")
    params = sum(p.numel() for p in eager.model.parameters())
    arms = {
        "trainer eager": trainer_step(eager),
        "trainer compiled": trainer_step(compiled),
        "plain eager": plain_loop(eager, compiled=False),
        "plain compiled": plain_loop(eager, compiled=True),
    }
    first: dict[str, float] = {}
    losses: dict[str, list[float]] = {name: [] for name in arms}
    for name, step in arms.items():  # compiles forward and backward of the compiled arms
        start = time.perf_counter()
        losses[name] += timed_steps(step, 2)[1]
        first[name] = time.perf_counter() - start
    med: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, step in arms.items():
            walls, ls = timed_steps(step, steps)
            med[name].append(statistics.median(walls))
            losses[name] += ls
    ms = {name: 1e3 * statistics.median(v) for name, v in med.items()}
    spread = {name: f"{1e3 * min(v):.0f}..{1e3 * max(v):.0f}" for name, v in med.items()}
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["trainer compiled"], losses["trainer eager"]))
    return (
        f"| {label} | {params / 1e6:.1f}M | {ms['trainer eager']:.0f} ({spread['trainer eager']}) "
        f"| {ms['trainer compiled']:.0f} ({spread['trainer compiled']}) "
        f"| {ms['trainer eager'] / ms['trainer compiled']:.2f} "
        f"| {ms['plain eager']:.0f} ({spread['plain eager']}) | {ms['plain compiled']:.0f} ({spread['plain compiled']}) "
        f"| {ms['plain eager'] / ms['plain compiled']:.2f} | {ms['plain compiled'] / ms['trainer compiled']:.2f} "
        f"| {first['trainer compiled']:.0f} / {first['plain compiled']:.0f} | {diff:.1e} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {"toy": SMOKE} if args.smoke else {m: MODELS[m] for m in args.models.split(",")}
    rounds, steps = (1, 2) if args.smoke else (args.rounds, args.steps)
    print(f"torch {torch.__version__}, 1 thread, {rounds} interleaved rounds of {steps} steps; load {os.getloadavg()}")
    print(
        "\n| model | params | Trainer eager ms/step (spread of round medians) | Trainer compiled | Trainer speed-up "
        "| plain eager | plain torch.compile(model) | plain speed-up | Trainer compiled vs plain compiled (>1: Trainer "
        "faster) | first 2 compiled steps s (Trainer / plain) | max rel. loss diff (Trainer) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="shardyard-compile-") as tmp:
        for label, (spec_path, overrides) in models.items():
            print(bench(label, spec_path, overrides, rounds, steps, Path(tmp)), flush=True)
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
